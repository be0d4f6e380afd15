"""``vlm chat``: a conversation about images in the terminal, streamed as it is generated."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from vlm.eval.predict import InputError, Predictor, load_image

HELP = (
    "/image PATH attaches an image to your next message, /reset starts over, /quit (or Ctrl-D) leaves, "
    "/help shows this; start a message with // to send one that begins with /"
)


def chat_loop(
    predictor: Predictor,
    images: list[str],
    *,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """Runs the conversation until ``/quit`` or the end of input; returns the exit code (0).

    The history (every turn and its images) is sent with each new question, so a later
    question can refer to an earlier answer.
    """
    history: list[dict[str, Any]] = []
    pending = [_image_part(path) for path in images]  # go with the first message
    print(f"vlm chat: {len(pending)} image(s) attached. {HELP}", file=out, flush=True)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return 0
        if not line:
            continue
        if line.startswith("//"):  # a message that begins with "/", sent as written after the first
            line = line[1:]
        elif line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history, pending = [], []
                print("(conversation cleared)", file=out, flush=True)
            elif command == "/image":
                path = argument.strip()
                try:
                    pending.append(_image_part(path))
                except InputError as err:
                    print(f"(cannot attach: {err})", file=out, flush=True)
                    continue
                print(f"(attached {path}; it goes with your next message)", file=out, flush=True)
            elif command == "/help":
                print(f"({HELP})", file=out, flush=True)
            else:
                print(f"(unknown command {command}, not sent; {HELP})", file=out, flush=True)
            continue
        history.append({"role": "user", "content": [*pending, {"type": "text", "text": line}]})
        pending = []
        print("vlm> ", end="", file=out, flush=True)
        try:
            reply = predictor.chat(history, on_text=lambda text: print(text, end="", file=out, flush=True))
        except InputError as err:  # e.g. the history outgrew max_length: say so, keep the session
            history.pop()
            print(f"\n(cannot answer: {err}; /reset starts over)", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply})


def _image_part(path: str) -> dict[str, Any]:
    return {"type": "image", "image": load_image(path)}
