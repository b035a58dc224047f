import re

import pytest
import yaml

from dalle_core.errors import ConfigError
from pipeline.config import Config, config_from_dict, flatten, load_config, merged_config
from tests.conftest import TINY


def test_typo_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dvae": {"codebok_size": 512}})
    assert str(e.value) == "dvae.codebok_size: unknown key; did you mean codebook_size?"


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"^tranformer: unknown key; did you mean transformer\?$"):
        config_from_dict({"tranformer": {}})


def test_bad_value_names_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dvae": {"quantizer": "vqgan"}})
    msg = str(e.value)
    assert msg.startswith("dvae.quantizer:") and "'gumbel'" in msg and "'vq'" in msg and "vqgan" in msg
    assert "\n" not in msg


def test_set_overrides_any_key_with_yaml_types():
    cfg = load_config(TINY, ["dvae.codebook_size=1024", "transformer.train.lr=3e-4",
                             "data.shapes.holdout=[purple triangle]", "store=memory://x"])
    assert cfg.dvae.codebook_size == 1024
    assert cfg.transformer.train.lr == pytest.approx(3e-4)
    assert cfg.data.shapes.holdout == ["purple triangle"]
    assert cfg.store.root == "memory://x"


def test_override_typo_fails_like_yaml_typo():
    with pytest.raises(ConfigError, match="did you mean codebook_size"):
        load_config(TINY, ["dvae.codebok_size=3"])


def test_missing_file_and_bad_holdout():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="pink triangle"):
        config_from_dict({"data": {"shapes": {"holdout": ["pink triangle"]}}})


def test_shipped_configs_parse():
    for name in ("tiny", "shapes"):
        load_config(TINY.parent / f"{name}.yaml")


def test_a_partial_config_is_laid_over_the_deployments_own_not_the_defaults():
    base = yaml.safe_load(TINY.read_text()) | {"store": "/srv/dalle-store"}
    merged = merged_config(base, {"transformer": {"depth": 3, "train": {"lr": 5e-4}}, "store": {"root": "/tmp/s"}})
    tiny = load_config(TINY)
    assert (merged.transformer.depth, merged.transformer.train.lr) == (3, 5e-4)
    assert merged.transformer.dim == tiny.transformer.dim != Config().transformer.dim
    assert merged.transformer.train.max_steps == tiny.transformer.train.max_steps
    assert merged.data == tiny.data and merged.store.root == "/tmp/s"
    assert merged_config(base, {}).model_dump() == config_from_dict(base).model_dump()
    with pytest.raises(ConfigError, match="^transformer.dim 64 is not divisible by heads 3$"):  # checked whole
        merged_config(base, {"transformer": {"heads": 3}})


def test_flatten_for_mlflow_params():
    flat = flatten(config_from_dict({}).dvae)
    assert flat["train.lr"] == 2e-3 and flat["codebook_size"] == 512


def test_prime_rows_checked_against_the_grid_unless_a_pretrained_dvae_sets_it():
    base = {"data": {"image_size": 32}, "dvae": {"num_downsamples": 2},
            "generate": {"prime_image": "cat.png", "prime_rows": 12}}  # 32 px / 4 = 8 rows
    with pytest.raises(ConfigError, match="the token grid has 8 rows, so use 1 to 7"):
        config_from_dict(base)
    # a pretrained dVAE's grid comes from its files: K is checked when they are loaded (tasks.generate.source_edit)
    config_from_dict({**base, "dvae": {"num_downsamples": 2, "pretrained": "weights/openai"}})
    with pytest.raises(ConfigError, match="prime_rows=0 must be at least 1"):
        config_from_dict({**base, "generate": {"prime_image": "cat.png", "prime_rows": 0},
                          "dvae": {"pretrained": "weights/openai"}})


@pytest.mark.parametrize("generate, message", [
    ({"edit_mode": "inpaint", "edit_image": "a.png", "edit_keep": 0.5},
     "generate.edit_keep does not apply to generate.edit_mode inpaint (it takes generate.edit_region or generate.edit_mask)"),
    ({"edit_mode": "variations", "edit_image": "a.png", "edit_region": [0, 0, 4, 4]},
     "generate.edit_region does not apply to generate.edit_mode variations"),
    ({"edit_mode": "outpaint", "edit_image": "a.png"}, "generate.edit_image needs generate.edit_region x0,y0,x1,y1"),
    ({"edit_mode": "inpaint", "edit_image": "a.png"}, "generate.edit_image needs generate.edit_region x0,y0,x1,y1 or "
                                                      "generate.edit_mask"),
    ({"edit_mode": "inpaint", "edit_image": "a.png", "edit_region": [0, 0, 4, 4], "edit_mask": "m.png"},
     "generate.edit_region and generate.edit_mask were both given"),
    ({"top_k": -1}, "generate.top_k: Input should be greater than or equal to 0"),
    ({"num_candidates": 0}, "generate.num_candidates: Input should be greater than or equal to 1"),
])
def test_edit_and_sampling_keys_are_checked_by_the_core_request_types_in_config_names(generate, message):
    """The config builds `EditRequest` and `SamplingSettings`: their one check, its errors in the config's keys."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"generate": generate})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_config_section_is_the_core_request():
    cfg = config_from_dict({"generate": {"edit_mode": "outpaint", "edit_image": "a.png", "edit_region": [1, 2, 3, 4],
                                         "top_k": 0, "cond_scale": 1.5}})
    edit = cfg.generate.edit_request()
    assert (edit.mode, edit.image, edit.region, edit.mask) == ("outpaint", "a.png", (1, 2, 3, 4), None)
    assert cfg.generate.sampling().top_k is None and cfg.generate.sampling().cond_scale == 1.5  # 0 = off
    assert config_from_dict({"generate": {"prime_image": "b.png", "prime_rows": 3}}).generate.edit_request().prime_rows == 3


# Text the CLI passes through --set as JSON: every Unicode plane, and what YAML reads specially.
ODD_TEXT = ["😀🎨🌈", "a 🐱 on a 🛹", "\U00020000\U0002A6D6 CJK ext B", "\ue000\U000F0000\U0010FFFD private use",
            "日本語のテキスト", "quotes \" and ' and `", "# not a comment", "key: value", "- leading dash", "!tag",
            "&anchor *alias", "%directive", "line\x85NEL", "line\u2028LS\u2029PS", "\ufeffBOM first", "nul\x00byte",
            "tab\there", "back\\slash \\u0041", "  spaces kept  ", "null", "true", "1e3", "[not, a, list]", "{a: 1}"]


@pytest.mark.parametrize("text", ODD_TEXT)
def test_any_text_round_trips_through_a_json_override(text):
    import json

    cfg = load_config(TINY, [f"generate.prompts={json.dumps([text, 'plain'])}"])
    assert cfg.generate.prompts == [text, "plain"]


def test_a_lone_surrogate_escape_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^--set generate\.prompts: .*half of a UTF-16 surrogate pair"):
        load_config(TINY, ['generate.prompts=["\\ud83d alone"]'])


@pytest.mark.parametrize("prompts", [[""], ["a cat", "   "], ["\t\n"]])
def test_empty_prompts_fail_before_any_work(prompts):
    with pytest.raises(ConfigError, match=r"^generate\.prompts: prompt \d of \d is '.*'; every prompt needs some text"):
        config_from_dict({"generate": {"prompts": prompts}})


def test_each_section_builds_its_models_config_from_its_own_fields():
    from dalle_core.clip import CLIPConfig
    from dalle_core.dvae import DVAEConfig
    from dalle_core.transformer import DALLEConfig

    cfg = config_from_dict({"dvae": {"codebook_size": 64, "recon_loss": "logit_laplace", "norm_mean": [0.1, 0.2, 0.3],
                                     "disc_layers": 2},
                            "transformer": {"dim": 48, "heads": 6, "text_loss_weight": 0.25},
                            "clip": {"patch_size": 8, "text_layers": 2}})
    dvae = cfg.dvae.dvae_config(16)
    assert dvae == DVAEConfig(image_size=16, codebook_size=64, logit_laplace=True, norm_mean=(0.1, 0.2, 0.3))
    assert cfg.dvae.model_copy(update={"adversarial": True}).dvae_config(16).disc_layers == 2  # else no discriminator
    assert cfg.transformer.dalle_config(text_vocab=300, text_len=8, pad_id=1, image_vocab=64, image_grid=4) == \
        DALLEConfig(text_vocab=300, text_len=8, pad_id=1, image_vocab=64, image_grid=4, dim=48, heads=6,
                    text_loss_weight=0.25)
    assert cfg.clip.clip_config(16, 300, 8, 1) == CLIPConfig(image_size=16, text_vocab=300, text_len=8, pad_id=1,
                                                             patch_size=8, text_layers=2)


def test_tokenizer_levels_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"^dvae.channel_mult \[1, 2\] has 2 levels; num_downsamples=3 needs 4"):
        config_from_dict({"dvae": {"num_downsamples": 3, "channel_mult": [1, 2]}})
    with pytest.raises(ConfigError, match=r"dvae.attention needs dvae.channel_mult"):
        config_from_dict({"dvae": {"attention": True}})
    with pytest.raises(ConfigError, match=r"makes a level 64000 channels wide; keep hidden \* max\(channel_mult\) at"):
        config_from_dict({"dvae": {"num_downsamples": 2, "channel_mult": [1, 1000, 2]}})
    with pytest.raises(ConfigError, match=r"quantizer pixel-kmeans has none"):
        config_from_dict({"dvae": {"quantizer": "pixel-kmeans", "num_downsamples": 2, "channel_mult": [1, 2, 2]}})
    with pytest.raises(ConfigError, match=r"^dvae.channel_mult.1: Input should be greater than or equal to 1"):
        config_from_dict({"dvae": {"num_downsamples": 2, "channel_mult": [1, 0, 2]}})


def test_model_fields_are_declared_once_in_the_model_dataclasses():
    """The sections take each model field (type, range, default) from the model's dataclass: a range set there
    is enforced on the YAML key, and every field reaches the built model config."""
    from dalle_core.clip import CLIPConfig
    from dalle_core.dvae import DVAEConfig
    from dalle_core.transformer import DALLEConfig

    with pytest.raises(ConfigError, match=r"^transformer.dropout: Input should be less than 1 \(got 1.0\)$"):
        config_from_dict({"transformer": {"dropout": 1.0}})
    with pytest.raises(ConfigError, match=r"^dvae.codebook_size: Input should be less than or equal to 65536"):
        config_from_dict({"dvae": {"codebook_size": 70000}})
    cfg = config_from_dict({"dvae": {"hidden": 48, "channel_mult": [1, 2, 4], "disc_channels": 32},
                            "transformer": {"depth": 3, "text_loss_weight": 0.2}, "clip": {"text_heads": 2}})
    assert cfg.dvae.dvae_config(64) == DVAEConfig(image_size=64, hidden=48, channel_mult=(1, 2, 4), disc_channels=32)
    assert cfg.transformer.dalle_config(500, 12, 0, 64, 8) == DALLEConfig(
        text_vocab=500, text_len=12, pad_id=0, image_vocab=64, image_grid=8, depth=3, text_loss_weight=0.2)
    assert cfg.clip.clip_config(32, 500, 12, 0) == CLIPConfig(image_size=32, text_vocab=500, text_len=12, pad_id=0,
                                                             text_heads=2)


@pytest.mark.parametrize("sets, message", [
    (["generate.guidance_start=0.9", "generate.guidance_end=0.1"],
     "generate.guidance_start is 0.9 and guidance_end 0.1; the start must come before the end"),
    (["generate.guidance_schedule=cosine"], "generate.guidance_schedule: Input should be 'constant' or 'linear'"),
    (["generate.negative_prompt=''"], "generate.negative_prompt: String should have at least 1 character"),
    ([f"generate.negative_prompt={'x' * 200000}"], "generate.negative_prompt: String should have at most 1000 "
                                                   "characters (got a string of 200000 characters)"),
    (["generate.guidance_start=.nan"], "generate.guidance_start: Input should be a finite number (got nan)")])
def test_guidance_settings_are_checked_when_the_config_loads(sets, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(TINY, sets)
    steered = load_config(TINY, ["generate.negative_prompt=not red", "generate.guidance_schedule=linear"])
    assert steered.generate.sampling().negative_prompt == "not red"
