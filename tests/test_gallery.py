"""The HTML gallery: wrong predictions are marked, and one checkbox shows the mistakes only."""

import re

from PIL import Image

from vlm.eval.gallery import write_gallery


def test_mistakes_are_marked_and_can_be_shown_alone(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 200))
    items = [
        {
            "image": red,
            "question": "what color is it?",
            "prediction": "red",
            "answers": ["red"],
            "correct": True,
        },
        {
            "image": red,
            "question": "what color is it?",
            "prediction": "blue",
            "answers": ["red"],
            "correct": False,
        },
        {
            "images": [red, blue, red],
            "question": "2-shot: <image>red<image>blue<image>",
            "prediction": "red",
            "answers": ["red"],
            "correct": True,
            "history": ["user: hi", "assistant: hello"],
        },
        {"image": blue, "prediction": "a blue square", "references": ["a blue square"]},
    ]
    write_gallery(tmp_path / "g.html", "test", items, {"vqa_accuracy": 0.5})
    page = (tmp_path / "g.html").read_text()
    figures = re.findall(r'<figure class="(\w*)">', page)
    assert figures == ["right", "wrong", "right", ""]
    assert page.count("<img") == 1 + 1 + 3 + 1 and "user: hi" in page
    # The checkbox comes before the grid, and checked it hides every figure not marked wrong.
    assert page.index("id='mistakes'") < page.index("class='grid'")
    assert "#mistakes:checked ~ .grid figure:not(.wrong) { display: none; }" in page
    assert "mistakes only (1 of 4)" in page
