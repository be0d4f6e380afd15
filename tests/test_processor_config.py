"""The processor settings travel with the model: one typed config, one set of defaults."""

import dataclasses
import json

import pytest
import tiny
from test_train import tiny_recipe

from vlm import ConfigError, ModelConfig, build_model, from_pretrained, save_pretrained
from vlm.config import ProcessorConfig
from vlm.data.shapes import tokenizer as shapes_tokenizer
from vlm.eval.predict import Predictor
from vlm.processor import Processor
from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import train


def test_save_pretrained_keeps_the_processor_settings(tmp_path):
    """A model saved with save_pretrained directly (no recipe) is loaded with its own settings."""
    config = tiny.model_config()
    config.processor = ProcessorConfig(max_length=40, resize="pad", templates={"caption": "{images}"})
    save_pretrained(build_model(config), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["processor"]
    assert saved == {
        "max_length": 40,
        "resize": "pad",
        "templates": {"caption": "{images}"},
        "chat": None,
        "conversation": "auto",
        "tiling": {"name": "none"},
    }
    assert from_pretrained(tmp_path).config.processor == config.processor


def test_a_predictor_prepares_inputs_as_the_model_was_trained(shapes_dir, tmp_path):
    """A recipe's [model.processor] settings are saved with the trained model: the Predictor
    uses exactly those, from the model directory alone."""
    tree = tiny_recipe(shapes_dir, tmp_path, max_steps=1)
    tree["model"]["processor"] = {"max_length": 100, "resize": "pad", "templates": {"caption": "{images}"}}
    model_dir = train(recipe_from_dict(tree), progress=False)["model"]
    predictor = Predictor(model_dir)
    assert predictor.model.config.processor == ProcessorConfig(100, "pad", {"caption": "{images}"})
    assert predictor.processor.max_length == 100
    assert predictor.processor.templates["caption"] == "{images}"
    assert "PadToSquare" in repr(predictor.transform)


def test_models_saved_before_the_processor_table_keep_their_settings():
    """Older config.json files kept the settings in extra["processor"]: they still load them."""
    data = tiny.model_config().to_dict()
    del data["processor"]
    data["extra"] = {"processor": {"max_length": 96, "resize": "pad", "templates": {}}, "note": "run 7"}
    config = ModelConfig.from_dict(data)
    assert config.processor == ProcessorConfig(max_length=96, resize="pad")
    assert config.extra == {"note": "run 7"}


def test_one_set_of_defaults():
    """Processor, ModelConfig and a bare recipe all default to ProcessorConfig's values."""
    tok = shapes_tokenizer()
    default = ProcessorConfig()
    proc = Processor(tok, tokens_per_image=1)
    assert (proc.max_length, proc.config) == (default.max_length, default)
    assert tiny.model_config().processor == default
    assert Processor(tok, tokens_per_image=1, max_length=7).max_length == 7  # an override, one field


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"resize": "stretch"}, "processor.resize must be one of"), ({"max_length": 0}, "max_length must be")],
)
def test_bad_processor_settings_are_refused(settings, message):
    data = tiny.model_config().to_dict()
    data["processor"].update(settings)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("key", ["max_length", "resize", "templates"])
def test_a_recipe_with_the_old_data_keys_says_where_they_went(shapes_dir, tmp_path, key):
    tree = tiny_recipe(shapes_dir, tmp_path)
    tree["data"][key] = dataclasses.asdict(ProcessorConfig())[key]
    with pytest.raises(ConfigError, match=f"model.processor.{key}"):
        recipe_from_dict(tree)
