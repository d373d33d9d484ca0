"""Published SD1.5 ControlNet names (sdstack.control.names): every name the issue lists,
their renamings, and a property test over decorated names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.control.names import (
    KNOWN_CONTROL_MODELS,
    KnownControlModel,
    known_control_model,
    model_stem,
)

V11 = {
    "control_v11p_sd15_canny": "canny",
    "control_v11p_sd15_openpose": "openpose",
    "control_v11p_sd15_lineart": "lineart",
    "control_v11p_sd15_scribble": "scribble",
    "control_v11p_sd15_softedge": "softedge",
    "control_v11p_sd15_mlsd": "mlsd",
    "control_v11p_sd15_normalbae": "normal",
    "control_v11p_sd15_seg": "seg",
    "control_v11p_sd15_inpaint": "inpaint",
    "control_v11p_sd15s2_lineart_anime": "lineart",
    "control_v11f1p_sd15_depth": "depth",
    "control_v11e_sd15_ip2p": "ip2p",
    "control_v11e_sd15_shuffle": "shuffle",
    "control_v11f1e_sd15_tile": "tile",
}
V10 = {
    "control_sd15_canny": "canny",
    "control_sd15_depth": "depth",
    "control_sd15_hed": "softedge",
    "control_sd15_mlsd": "mlsd",
    "control_sd15_normal": "normal",
    "control_sd15_openpose": "openpose",
    "control_sd15_scribble": "scribble",
    "control_sd15_seg": "seg",
}


@pytest.mark.parametrize(("name", "control_type"), [*V11.items(), *V10.items()])
def test_every_published_name(name, control_type):
    known = known_control_model(name)
    assert known is not None and known.name == name
    assert known.control_type == control_type
    assert known.version == ("1.1" if "v11" in name else "1.0")
    assert known.global_average_pooling == (control_type == "shuffle")


def test_suggested_modules():
    assert known_control_model("control_v11p_sd15_canny").suggested_module == "canny"
    assert known_control_model("control_v11f1e_sd15_tile").suggested_module == "tile_resample"
    assert known_control_model("control_v11e_sd15_ip2p").suggested_module == "none"
    assert known_control_model("control_sd15_hed").suggested_module == "softedge_hed"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("control_v11p_sd15_canny [d14c016b]", "control_v11p_sd15_canny"),
        ("control_v11p_sd15_canny_fp16", "control_v11p_sd15_canny"),
        ("control_v11p_sd15_canny.fp16.safetensors", "control_v11p_sd15_canny"),
        ("models/ControlNet/control_v11p_sd15_canny.pth", "control_v11p_sd15_canny"),
        (
            "C:\\webui\\models\\ControlNet\\control_v11f1p_sd15_depth.safetensors",
            "control_v11f1p_sd15_depth",
        ),
        ("lllyasviel/control_v11p_sd15_openpose", "control_v11p_sd15_openpose"),
        ("lllyasviel/sd-controlnet-canny", "control_sd15_canny"),
        ("control_canny-fp16.safetensors", "control_sd15_canny"),
        ("control_hed-fp16", "control_sd15_hed"),
        ("CONTROL_V11E_SD15_SHUFFLE", "control_v11e_sd15_shuffle"),
        ("control-v11p-sd15-seg", "control_v11p_sd15_seg"),
    ],
)
def test_renamings(text, canonical):
    assert known_control_model(text).name == canonical


@pytest.mark.parametrize(
    "text", ["my_canny_model", "t2iadapter_canny_sd14v1", "", "fp16", "control_v11p_sd21_canny"]
)
def test_unknown_names(text):
    assert known_control_model(text) is None


def test_model_stem():
    assert model_stem("a/b/control_v11p_sd15_canny.safetensors [0123abcd]") == (
        "control_v11p_sd15_canny"
    )
    assert model_stem("lllyasviel/sd-controlnet-canny/") == "sd-controlnet-canny"


def test_registry_values():
    assert all(isinstance(v, KnownControlModel) for v in KNOWN_CONTROL_MODELS.values())
    assert set(V11) | set(V10) <= set(KNOWN_CONTROL_MODELS.names())


@given(
    name=st.sampled_from(sorted(KNOWN_CONTROL_MODELS.names())),
    upper=st.booleans(),
    precision=st.sampled_from(["", "_fp16", "-fp16", ".fp16", "_fp32", "_bf16"]),
    suffix=st.sampled_from(["", ".safetensors", ".pth", ".ckpt"]),
    folder=st.sampled_from(["", "models/ControlNet/", "lllyasviel/", "x\\y\\"]),
    label=st.sampled_from(["", " [d14c016b]", " [0123456789]"]),
)
def test_decorated_names_are_recognised(name, upper, precision, suffix, folder, label):
    text = f"{folder}{name.upper() if upper else name}{precision}{suffix}{label}"
    assert known_control_model(text) == KNOWN_CONTROL_MODELS.get(name)
