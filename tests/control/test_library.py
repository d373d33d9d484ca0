"""ControlNets by name (sdstack.control.library): the extension's folders and labels."""

from __future__ import annotations

import os
import warnings

import pytest

from sdstack.control.library import (
    ControlNetNotFoundError,
    controlnet_folders,
    controlnet_names,
    find_controlnet,
    list_controlnets,
)
from sdstack.control.tiny import write_tiny_controlnet
from sdstack.errors import SdstackWarning, UnknownNameError
from sdstack.models.hashes import file_sha256, legacy_model_hash
from sdstack.models.library import ModelLibrary, ModelLibraryError

NO_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A web UI folder: two ControlNets in models/ControlNet (one in a subfolder), one in the
    extension's folder, a diffusers folder, and a file the listing must skip."""
    base = tmp_path_factory.mktemp("webui")
    models = base / "models" / "ControlNet"
    write_tiny_controlnet(models / "control_v11p_sd15_canny.safetensors", seed=1)
    write_tiny_controlnet(models / "depth" / "control_v11f1p_sd15_depth.pth", seed=2)
    write_tiny_controlnet(models / "sd-controlnet-hed", layout="diffusers-folder", seed=3)
    (models / "notes.txt").write_text("not a model")
    (base / "models" / "Stable-diffusion").mkdir()
    (models / ".hidden.safetensors").write_bytes(b"")
    extension = base / "extensions" / "sd-webui-controlnet" / "models"
    write_tiny_controlnet(extension / "control_v11e_sd15_shuffle.safetensors", seed=4)
    return base


def test_listing(root):
    folders = controlnet_folders(root)
    assert folders == (
        root / "models" / "ControlNet",
        root / "extensions" / "sd-webui-controlnet" / "models",
    )
    entries = list_controlnets(folders)
    assert [(e.name, e.relative_path) for e in entries] == [
        ("control_v11p_sd15_canny", "control_v11p_sd15_canny.safetensors"),
        ("control_v11f1p_sd15_depth", "depth/control_v11f1p_sd15_depth.pth"),
        ("sd-controlnet-hed", "sd-controlnet-hed"),
        ("control_v11e_sd15_shuffle", "control_v11e_sd15_shuffle.safetensors"),
    ]
    assert controlnet_names(root, environ=NO_ENV) == [e.name for e in entries]
    assert controlnet_names(None, environ=NO_ENV) == []


@pytest.mark.parametrize(
    ("text", "relative"),
    [
        ("control_v11p_sd15_canny", "models/ControlNet/control_v11p_sd15_canny.safetensors"),
        (
            "control_v11p_sd15_canny.safetensors",
            "models/ControlNet/control_v11p_sd15_canny.safetensors",
        ),
        (
            "depth/control_v11f1p_sd15_depth",
            "models/ControlNet/depth/control_v11f1p_sd15_depth.pth",
        ),
        (
            "depth\\control_v11f1p_sd15_depth.pth",
            "models/ControlNet/depth/control_v11f1p_sd15_depth.pth",
        ),
        ("sd-controlnet-hed", "models/ControlNet/sd-controlnet-hed"),
        (
            "control_v11e_sd15_shuffle",
            "extensions/sd-webui-controlnet/models/control_v11e_sd15_shuffle.safetensors",
        ),
    ],
)
def test_find_by_name(root, text, relative):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_controlnet(text, root=root, environ=NO_ENV) == root / relative


def test_label_with_the_files_hash(root):
    path = root / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors"
    label = f"control_v11p_sd15_canny [{legacy_model_hash(path)}]"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_controlnet(label, root=root, environ=NO_ENV) == path
        sha = f"control_v11p_sd15_canny [{file_sha256(path)[:10]}]"
        assert find_controlnet(sha, root=root, environ=NO_ENV) == path


def test_label_with_another_hash_warns(root):
    path = root / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors"
    with pytest.warns(SdstackWarning) as caught:
        found = find_controlnet("control_v11p_sd15_canny [d14c016b]", root=root, environ=NO_ENV)
    assert found == path
    assert str(caught[0].message) == (
        f"ControlNet 'control_v11p_sd15_canny': the label's hash [d14c016b] is not the file's "
        f"[{legacy_model_hash(path)}] ({path}); using the file found by name"
    )


def test_unknown_name_falls_back_to_the_hash(root):
    path = root / "models" / "ControlNet" / "depth" / "control_v11f1p_sd15_depth.pth"
    label = f"renamed_depth [{legacy_model_hash(path)}]"
    assert find_controlnet(label, root=root, environ=NO_ENV) == path
    with pytest.raises(ControlNetNotFoundError) as caught:
        find_controlnet("renamed_depth [00000000]", root=root, environ=NO_ENV)
    assert str(caught.value) == (
        f"no ControlNet named 'renamed_depth' in {root / 'models/ControlNet'}, "
        f"{root / 'extensions/sd-webui-controlnet/models'}; no ControlNet has the hash "
        f"'00000000' in {root / 'models/ControlNet'}, "
        f"{root / 'extensions/sd-webui-controlnet/models'}"
    )


def test_not_found_suggests_the_closest(root):
    with pytest.raises(ControlNetNotFoundError) as caught:
        find_controlnet("control_v11p_sd15_cany", root=root, environ=NO_ENV)
    assert isinstance(caught.value, UnknownNameError)
    assert str(caught.value).endswith(
        "; did you mean control_v11p_sd15_canny, control_v11f1p_sd15_depth, "
        "control_v11e_sd15_shuffle?"
    )


def test_existing_path_wins(root, tmp_path):
    path = write_tiny_controlnet(tmp_path / "control_v11p_sd15_canny.safetensors")
    assert find_controlnet(str(path), root=root, environ=NO_ENV) == path
    assert find_controlnet(path, environ=NO_ENV) == path


def test_no_root(tmp_path):
    with pytest.raises(ControlNetNotFoundError) as caught:
        find_controlnet("control_v11p_sd15_canny", environ=NO_ENV)
    assert str(caught.value) == (
        "ControlNet model 'control_v11p_sd15_canny': no such file; give its path, or the web "
        "UI folder with --root (or SDSTACK_ROOT) to look it up by name in models/ControlNet"
    )


def test_environment_variable_and_library_roots(root):
    found = find_controlnet("control_v11p_sd15_canny", environ={"SDSTACK_ROOT": str(root)})
    assert found.parent == root / "models" / "ControlNet"
    assert find_controlnet("control_v11p_sd15_canny", root=ModelLibrary(root)) == found
    # the models/ folder itself as the root: ControlNet/ and ../extensions/...
    models = root / "models"
    assert find_controlnet("control_v11p_sd15_canny", root=models, environ=NO_ENV) == found
    shuffle = find_controlnet("control_v11e_sd15_shuffle", root=models, environ=NO_ENV)
    assert shuffle.parent == root / "extensions" / "sd-webui-controlnet" / "models"


def test_bad_roots(tmp_path):
    with pytest.raises(ModelLibraryError, match=r"--root .*nowhere: folder not found"):
        find_controlnet("x", root=tmp_path / "nowhere", environ=NO_ENV)
    with pytest.raises(ModelLibraryError, match=r"SDSTACK_ROOT=.*nowhere: folder not found"):
        find_controlnet("x", environ={"SDSTACK_ROOT": str(tmp_path / "nowhere")})
    with pytest.raises(ControlNetNotFoundError, match=r"under .* \(no models/ControlNet or "):
        find_controlnet("x", root=tmp_path, environ=NO_ENV)


def test_same_name_in_two_folders_is_ambiguous(tmp_path):
    write_tiny_controlnet(tmp_path / "models" / "ControlNet" / "a" / "cn.safetensors")
    write_tiny_controlnet(tmp_path / "models" / "ControlNet" / "b" / "cn.safetensors")
    with pytest.raises(ModelLibraryError, match="ControlNet name 'cn' is ambiguous"):
        find_controlnet("cn", root=tmp_path, environ=NO_ENV)
    assert find_controlnet("b/cn", root=tmp_path, environ=NO_ENV).parent.name == "b"


def test_special_files_are_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "models" / "ControlNet"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "pipe.safetensors")
    with pytest.warns(SdstackWarning, match="a FIFO"):
        assert list_controlnets((folder,)) == []


def test_open_controlnet_by_label(root):
    from sdstack.control.library import open_controlnet

    path = root / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors"
    loaded = open_controlnet(
        f"control_v11p_sd15_canny [{legacy_model_hash(path)}]", root=root, environ=NO_ENV
    )
    assert loaded.path == path
    assert loaded.label == f"control_v11p_sd15_canny [{legacy_model_hash(path)}]"
    assert loaded.known.control_type == "canny"
