"""The reference's control modules that sdstack does not run, and why.

Detectors that run a network (OpenPose, MiDaS, HED, ...) need annotator weights that
sdstack does not download; a few weight-free ones are not implemented. Asking for any of
them raises :class:`~sdstack.control.preprocessors.PreprocessorUnavailableError` with
the reason and what to do (run it elsewhere, pass the map with module ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdstack.control.preprocessors import UnknownPreprocessorError
from sdstack.registry import Registry


@dataclass(frozen=True)
class UnavailablePreprocessor:
    """A reference preprocessor sdstack does not run: ``needs`` names the network and
    its weight files (None: it needs none, ``reason`` says why it is missing)."""

    name: str
    needs: str | None
    reason: str = ""

    def message(self) -> str:
        """``control module 'x' needs ...; <what to do>``."""
        if self.needs is None:
            return f"control module {self.name!r} {self.reason}"
        return (
            f"control module {self.name!r} needs the annotator weights of {self.needs}, "
            "which sdstack does not download; run this preprocessor elsewhere (e.g. the "
            "web UI's ControlNet preview, then save the map) and pass the map image with "
            "module 'none'"
        )


UNAVAILABLE_PREPROCESSORS: Registry[UnavailablePreprocessor] = Registry(
    "control module", UnknownPreprocessorError
)
"""Name -> :class:`UnavailablePreprocessor` of every reference module sdstack refuses."""

_OPENPOSE = "OpenPose (body_pose_model.pth, hand_pose_model.pth, facenet.pth)"
_HED = "HED (ControlNetHED.pth)"
_PIDI = "PiDiNet (table5_pidinet.pth)"
_MIDAS = "MiDaS (dpt_hybrid-midas-501f0c75.pt)"
_CLIP = "a CLIP vision encoder (clip_h.pth / clip_g.pth)"
_INSIGHTFACE = "InsightFace (antelopev2 / buffalo_l)"
# (reference name, aliases, network and weights) of the reference's weight detectors.
_WEIGHTED = (
    ("openpose", (), _OPENPOSE),
    ("openpose_face", (), _OPENPOSE),
    ("openpose_faceonly", (), _OPENPOSE),
    ("openpose_full", (), _OPENPOSE),
    ("openpose_hand", (), _OPENPOSE),
    ("dw_openpose_full", (), "DWPose (yolox_l.onnx, dw-ll_ucoco_384.onnx)"),
    ("animal_openpose", (), "RTMPose AP-10K (rtmpose-m_ap10k_256.onnx)"),
    ("densepose", ("densepose (pruple bg & purple torso)",), "DensePose"),
    ("densepose_parula", ("densepose_parula (black bg & blue torso)",), "DensePose"),
    ("depth_midas", ("depth",), _MIDAS),
    ("depth_leres", (), "LeReS (res101.pth)"),
    ("depth_leres++", (), "LeReS and its refiner (res101.pth, latest_net_G.pth)"),
    ("depth_zoe", (), "ZoeDepth (ZoeD_M12_N.pt)"),
    ("depth_anything", (), "Depth Anything (depth_anything_vitl14.pth)"),
    ("depth_anything_v2", (), "Depth Anything V2"),
    ("depth_hand_refiner", (), "MeshGraphormer (hand refiner)"),
    ("depth_marigold", (), "Marigold"),
    ("normal_bae", (), "NormalBae (scannet.pt)"),
    ("normal_midas", ("normal_map",), _MIDAS),
    ("normal_dsine", (), "DSINE (dsine.pt)"),
    ("softedge_hed", ("hed",), _HED),
    ("softedge_hedsafe", ("hed_safe",), _HED),
    ("softedge_pidinet", ("pidinet",), _PIDI),
    ("softedge_pidisafe", ("pidinet_safe",), _PIDI),
    ("softedge_teed", ("te_hed",), "TEED (7_model.pth)"),
    ("softedge_anyline", (), "Anyline (MTEED.pth)"),
    ("scribble_hed", ("fake_scribble",), _HED),
    ("scribble_pidinet", ("pidinet_scribble",), _PIDI),
    ("t2ia_sketch_pidi", ("pidinet_sketch",), _PIDI),
    ("mlsd", (), "M-LSD (mlsd_large_512_fp32.pth)"),
    ("seg_ofade20k", ("oneformer_ade20k",), "OneFormer ADE20K"),
    ("seg_ofcoco", ("oneformer_coco",), "OneFormer COCO"),
    ("seg_ufade20k", ("segmentation",), "UniFormer (upernet_global_small.pth)"),
    ("seg_anime_face", ("anime_face_segment",), "the anime face segmentation UNet"),
    ("mobile_sam", (), "MobileSAM (mobile_sam.pt)"),
    ("lineart_realistic", ("lineart",), "the lineart network (sk_model.pth)"),
    ("lineart_coarse", (), "the coarse lineart network (sk_model2.pth)"),
    ("lineart_anime", (), "the anime lineart network (netG.pth)"),
    ("lineart_anime_denoise", (), "the manga line network (erika.pth)"),
    ("mediapipe_face", (), "MediaPipe Face Mesh (the mediapipe package)"),
    ("inpaint_only+lama", (), "LaMa (ControlNetLama.pth)"),
    ("t2ia_style_clipvision", ("clip_vision",), _CLIP),
    ("ip-adapter_clip_h", ("ip-adapter_clip_sd15",), _CLIP),
    ("ip-adapter_clip_g", ("ip-adapter_clip_sdxl",), _CLIP),
    ("ip-adapter_face_id", (), _INSIGHTFACE),
    ("ip-adapter_face_id_plus", (), f"{_INSIGHTFACE} and {_CLIP}"),
    ("ip-adapter-auto", (), _CLIP),
    ("revision_clipvision", ("revision_ignore_prompt",), _CLIP),
    ("instant_id_face_embedding", (), _INSIGHTFACE),
    ("instant_id_face_keypoints", (), _INSIGHTFACE),
)
_NOT_MAPS = "works inside the reference's UNet hook, not as a control map, and"
# (reference name, aliases, why sdstack lacks it) of weight-free ones not implemented.
_MISSING = (
    ("shuffle", (), "needs no weights but is not implemented (the reference's random "
     "flow field is unseeded); shuffle the image elsewhere and use module 'none'"),
    ("t2ia_color_grid", ("color",), "is a T2I-Adapter preprocessor; sdstack loads no "
     "T2I-Adapters"),
    ("recolor_luminance", (), "is not implemented; make the gray image elsewhere and use "
     "module 'none'"),
    ("recolor_intensity", (), "is not implemented; make the gray image elsewhere and use "
     "module 'none'"),
    ("blur_gaussian", (), "is not implemented; blur the image elsewhere and use module "
     "'none' (or 'tile' to resample it)"),
    ("reference_only", (), f"{_NOT_MAPS} sdstack does not implement it"),
    ("reference_adain", (), f"{_NOT_MAPS} sdstack does not implement it"),
    ("reference_adain+attn", (), f"{_NOT_MAPS} sdstack does not implement it"),
    ("tile_colorfix", (), f"{_NOT_MAPS} sdstack does not implement it; use 'tile'"),
    ("tile_colorfix+sharp", (), f"{_NOT_MAPS} sdstack does not implement it; use 'tile'"),
    ("inpaint_global_harmonious", ("inpaint",), "needs the img2img inpainting mask, which "
     "sdstack's ControlNet does not take yet"),
    ("inpaint_only", (), "needs the img2img inpainting mask, which sdstack's ControlNet "
     "does not take yet"),
)  # fmt: skip
for _name, _aliases, _needs in _WEIGHTED:
    UNAVAILABLE_PREPROCESSORS.register(
        _name, UnavailablePreprocessor(_name, _needs), aliases=_aliases
    )
for _name, _aliases, _reason in _MISSING:
    UNAVAILABLE_PREPROCESSORS.register(
        _name, UnavailablePreprocessor(_name, None, _reason), aliases=_aliases
    )


def unknown_module_message(module: str) -> str:
    """``unknown control module 'x'; did you mean ...? Expected one of: <runnable>``,
    the nearest names taken among all modules (runnable and not)."""
    import difflib

    from sdstack.control.preprocessors import PREPROCESSORS
    from sdstack.registry import normalise_name

    if not isinstance(module, str):
        return f"control module {module!r}: expected a name such as 'canny' or 'none'"
    names = (*PREPROCESSORS.names(), *UNAVAILABLE_PREPROCESSORS.names())
    near = difflib.get_close_matches(module, names, n=3)
    if not near:
        by_key = {normalise_name(n): n for n in names}
        near = [by_key[k] for k in difflib.get_close_matches(normalise_name(module), by_key)]
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ";"
    return (
        f"unknown control module {module!r}{hint} expected one of: "
        f"{', '.join(PREPROCESSORS.names())} (`sdstack control modules` lists them and "
        "the reference's detectors that need weights)"
    )
