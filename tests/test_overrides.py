"""``--set key=value``: values are read as their dataclass fields say, a wrong one fails before
anything is built with one message naming the key, the type and the value, and ``null`` unsets
an optional key."""

import pytest

import vlm.train.commands
from vlm.cli import main
from vlm.schema import ConfigError
from vlm.train.recipe import RECIPES, load_recipe

SHAPES = str(RECIPES / "shapes.toml")


def recipe(*overrides):
    return load_recipe(SHAPES, list(overrides))


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("run.max_steps=ten", "expected int, got 'ten'"),
        ("run.max_steps=1.5", "expected int, got 1.5"),
        ("optim.lr=fast", "expected float, got 'fast'"),
        ("run.compile=yes", "expected bool (true or false), got 'yes'"),
        ("data.tasks=vqa", "expected list[str], got 'vqa'"),
        ("optim.betas=[0.9]", "expected tuple[float, float], got [0.9]"),
        ("data.train=[1, 2]", "expected str or list[str], got [1, 2]"),
        ("model.encoder.width=wide", "expected int, got 'wide'"),  # the encoder the recipe names
        ("model.processor.max_length=long", "expected int, got 'long'"),
        ("model.processor.templates={caption = 1}", "expected dict[str, str], got {'caption': 1}"),
        ("model.decoder.lora={r = 'eight'}", "model.decoder.lora.r: expected int, got 'eight'"),
        ("model.decoder.lora=8", "expected a LoraSettings table ({key = value, ...}) or null, got 8"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value(assignment, expected):
    with pytest.raises(ConfigError) as err:
        recipe(assignment)
    assert str(err.value) == f"--set {assignment}: {expected}"


def test_vlm_train_fails_on_a_wrong_value_before_it_builds_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vlm.train.commands, "train", lambda *a, **k: pytest.fail("training started"))
    code = main(["train", SHAPES, "--out", str(tmp_path / "run"), "--set", "run.max_steps=ten"])
    err = capsys.readouterr().err
    assert code == 2 and err == "vlm train: error: --set run.max_steps=ten: expected int, got 'ten'\n"
    assert not (tmp_path / "run").exists()


def test_the_part_the_overrides_name_types_their_keys_in_either_order():
    for overrides in (
        ["model.bridge.name=perceiver", "model.bridge.num_latents=many"],
        ["model.bridge.num_latents=many", "model.bridge.name=perceiver"],
    ):
        with pytest.raises(ConfigError, match="num_latents=many: expected int, got 'many'"):
            recipe(*overrides)


@pytest.mark.parametrize("word", ["null", "none", "NULL", "None"])
def test_null_unsets_an_optional_key(word):
    r = recipe(
        f"model.encoder.checkpoint={word}",
        f"model.processor.chat={word}",
        f"model.image_token_id={word}",
        f"model.decoder.lora={word}",
    )
    config = r.model_config()
    assert config.encoder.checkpoint is None and config.processor.chat is None
    assert config.image_token_id is None and config.decoder.lora is None


def test_null_on_a_key_that_is_not_optional_is_refused_with_its_type_and_default():
    with pytest.raises(ConfigError) as err:
        recipe("run.max_steps=null")
    assert (
        str(err.value)
        == "--set run.max_steps=null: run.max_steps cannot be unset, it takes int; its default is 1000"
    )
    with pytest.raises(ConfigError) as err:
        recipe("run.init_from=none")
    assert str(err.value) == (
        "--set run.init_from=none: run.init_from cannot be unset, it takes str; its default is ''; "
        """for the word itself, quote it: --set 'run.init_from="none"'"""
    )


def test_values_are_read_as_their_fields_say():
    r = recipe(
        "run.out=2024",  # a text field takes the text as written
        'run.device="null"',  # quoted: the word itself
        "optim.lr=1",  # an int where a float goes
        "run.compile=True",
        "optim.betas=[0.8, 0.99]",
        'data.train=["a/*.tar", "b"]',
        "data.val=c/{000..009}.tar",
        'model.processor.templates={caption = "{images}"}',
        "model.decoder.hf_config.n_layer=2",  # a free-form table: any value
        "model.decoder.lora={r = 4}",
    )
    assert r.run.out == "2024" and r.run.device == "null" and r.run.compile is True
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float) and r.optim.betas == (0.8, 0.99)
    assert r.data.train == ["a/*.tar", "b"] and r.data.val == "c/{000..009}.tar"
    config = r.model_config()
    assert config.processor.templates == {"caption": "{images}"} and config.decoder.hf_config["n_layer"] == 2
    assert config.decoder.lora.r == 4


def test_unknown_keys_still_name_the_keys_that_exist():
    with pytest.raises(ConfigError, match="unknown key.*'max_stepz'.*max_steps"):
        recipe("run.max_stepz=3")
    with pytest.raises(ConfigError, match="model.processor.max_length"):  # moved keys say where
        recipe("data.max_length=3")


def test_the_tiling_is_a_part_whose_name_types_its_keys():
    """``model.processor.tiling`` is typed by its kind, as encoders and bridges are."""
    recipe = load_recipe(
        RECIPES / "shapes.toml",
        ["model.processor.tiling.max_tiles=5", "model.processor.tiling.name=split"],
    )
    tiling = recipe.model_config().processor.tiling
    assert (tiling.name, tiling.max_tiles, tiling.markers) == ("split", 5, True)
    with pytest.raises(ConfigError, match="tiling.max_tiles=five: expected int or null, got 'five'"):
        load_recipe(
            RECIPES / "shapes.toml",
            ["model.processor.tiling.name=anyres", "model.processor.tiling.max_tiles=five"],
        )
    with pytest.raises(ConfigError, match="unknown tiling 'tiles'"):
        load_recipe(RECIPES / "shapes.toml", ["model.processor.tiling.name=tiles"]).model_config()


def test_remote_shard_limits_are_recipe_keys():
    recipe = load_recipe(RECIPES / "shapes.toml", ["data.shard_timeout_s=5", "data.shard_retries=1"])
    assert (recipe.data.shard_timeout_s, recipe.data.shard_retries) == (5, 1)
    with pytest.raises(ConfigError, match="data.shard_retries=often: expected int"):
        load_recipe(RECIPES / "shapes.toml", ["data.shard_retries=often"])


def test_switching_a_parts_kind_drops_the_recipes_keys_the_new_kind_lacks():
    # shapes.toml splits images (longest_edge = 48); "none" is the tiling kind, not an unset.
    assert recipe("model.processor.tiling.name=none").model_config().processor.tiling.name == "none"
    tiling = (
        recipe("model.processor.tiling.name=anyres", "model.processor.tiling.max_tiles=4")
        .model_config()
        .processor.tiling
    )
    assert (tiling.name, tiling.max_tiles) == ("anyres", 4)
    bridge = recipe("model.bridge.name=mlp2x_gelu").model_config().bridge  # keeps merge and bias
    assert (bridge.name, bridge.merge, bridge.bias) == ("mlp2x_gelu", 2, False)
    # A key given on the command line is the user's: still checked against the new kind.
    with pytest.raises(ConfigError, match="unknown key.*longest_edge"):
        recipe("model.processor.tiling.name=none", "model.processor.tiling.longest_edge=96").model_config()
