"""Training state files: everything a run needs to continue bit for bit (``--resume``).

A state is one safetensors file (no pickle, so a hostile file cannot run code), written
atomically. Tensors: ``lora/<kohya key>`` (the LoRA in float32: ``lora_down``, ``lora_up``,
``alpha``), ``optimizer/<param index>/<key>`` (AdamW ``step``, ``exp_avg``,
``exp_avg_sq``). Metadata ``sdstack_train_state`` is JSON: ``version``, ``step``
(optimizer steps done), ``epoch`` and ``batch`` (the next micro-batch: epoch index and
position in it), the AdamW ``param_groups`` (hyper-parameters, ``params`` as indices),
the fp16 ``scaler`` state (or null), the ``losses`` so far and a ``fingerprint`` of the
settings and data a resume must share.

Random draws (batch order, captions, flips, noise, timesteps) are not carried as
generator states: the loop derives every generator from ``(seed, epoch, batch)``
(``sdstack.train.loop``), so the state of every RNG at the resume point is a function
of those three numbers, which the file holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdstack.atomic_files import replace, temporary_file
from sdstack.errors import SdstackError
from sdstack.models.safetensors_header import check_safetensors_layout, safetensors_metadata
from sdstack.train.losslog import LossRecord

STATE_KEY = "sdstack_train_state"
STATE_VERSION = 1
STATE_SUFFIX = ".trainstate"


class TrainStateError(SdstackError):
    """A training state that cannot be written, read or resumed with these settings."""


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps.

    Attributes:
        step: optimizer steps done.
        epoch, batch: the next micro-batch to run (0-based epoch, index in its epoch).
        lora: kohya key -> float32 tensor (``TrainableLora.state_dict_kohya``).
        optimizer: ``torch.optim.AdamW.state_dict()``.
        scaler: ``torch.amp.GradScaler.state_dict()`` under fp16, else None.
        losses: one record per step done.
        fingerprint: settings and data that must match to resume (JSON values).
    """

    step: int
    epoch: int
    batch: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None
    losses: list[LossRecord] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _split_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list, dict]:
    """AdamW state -> (tensors, param_groups, per-parameter non-tensor values)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, list(state_dict["param_groups"]), plain


def save_train_state(path: str | os.PathLike[str], state: TrainState) -> Path:
    """Write ``state`` to ``path`` atomically (replacing a file of the same name).

    Raises:
        TrainStateError: the file cannot be written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"lora/{k}": v.detach().cpu().contiguous().clone() for k, v in state.lora.items()}
    optimizer_tensors, groups, plain = _split_optimizer(state.optimizer)
    tensors.update(optimizer_tensors)
    record = {
        "version": STATE_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "param_groups": groups,
        "optimizer_values": plain,
        "scaler": state.scaler,
        "losses": [[r.step, r.epoch, r.loss, r.lr_unet, r.lr_text_encoder] for r in state.losses],
        "fingerprint": state.fingerprint,
    }
    metadata = {STATE_KEY: json.dumps(record, sort_keys=True)}
    try:
        with temporary_file(path.parent, suffix=STATE_SUFFIX) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
            replace(temporary, path)
    except OSError as error:
        raise TrainStateError(f"training state {str(path)!r} cannot be written: {error}") from error
    return path


def _fail(path: Path, problem: str) -> TrainStateError:
    return TrainStateError(
        f"training state {str(path)!r}: {problem}; expected a {STATE_SUFFIX} file that "
        "sdstack train wrote (--save-every)"
    )


def _int_field(path: Path, record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, f"{key!r} is {value!r}, expected a whole number >= 0")
    return value


def _read_record(path: Path) -> dict[str, Any]:
    metadata = safetensors_metadata(path)
    text = metadata.get(STATE_KEY)
    if text is None:
        raise _fail(path, f"no {STATE_KEY!r} metadata (a LoRA or a model file?)")
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise _fail(path, f"its {STATE_KEY!r} metadata is not JSON ({error})") from error
    if not isinstance(record, dict):
        raise _fail(path, f"its {STATE_KEY!r} metadata is not a JSON object")
    if record.get("version") != STATE_VERSION:
        raise _fail(path, f"version {record.get('version')!r}, this sdstack reads {STATE_VERSION}")
    for key, kind in (("param_groups", list), ("optimizer_values", dict), ("losses", list)):
        if not isinstance(record.get(key), kind):
            raise _fail(path, f"{key!r} is not a JSON {kind.__name__}")
    if not isinstance(record.get("fingerprint"), dict):
        raise _fail(path, "'fingerprint' is not a JSON object")
    if record.get("scaler") is not None and not isinstance(record["scaler"], dict):
        raise _fail(path, "'scaler' is neither null nor a JSON object")
    return record


def _losses(path: Path, rows: list[Any]) -> list[LossRecord]:
    losses = []
    for row in rows:
        ok = isinstance(row, list) and len(row) == 5
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        if not ok:
            raise _fail(path, f"a loss record {row!r} is not [step, epoch, loss, lr, lr]")
        losses.append(LossRecord(int(row[0]), int(row[1]), float(row[2]), row[3], row[4]))
    return losses


def _optimizer_state(
    path: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or not parts[1].isdigit():
            raise _fail(path, f"tensor {key!r} is not optimizer/<index>/<name>")
        state.setdefault(int(parts[1]), {})[parts[2]] = tensor
    for index, values in record["optimizer_values"].items():
        if not str(index).isdigit() or not isinstance(values, dict):
            raise _fail(path, f"optimizer values {index!r} are not index -> object")
        state.setdefault(int(index), {}).update(values)
    for group in record["param_groups"]:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, int) for p in params):
            raise _fail(path, "an optimizer param group has no list of parameter indices")
    return {"state": state, "param_groups": record["param_groups"]}


def load_train_state(path: str | os.PathLike[str]) -> TrainState:
    """Read a state :func:`save_train_state` wrote (the layout checked before loading).

    Raises:
        TrainStateError: missing, not a safetensors file, no or bad state metadata,
            unexpected tensor names or fields of the wrong type.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TrainStateError(f"training state {str(path)!r}: no such file")
    try:
        check_safetensors_layout(path)
        record = _read_record(path)
        tensors = load_file(str(path))
    except SdstackError as error:
        if isinstance(error, TrainStateError):
            raise
        raise _fail(path, str(error)) from error
    except Exception as error:  # safetensors' own error types on a bad file
        if type(error).__name__ != "SafetensorError":
            raise
        raise _fail(path, f"unreadable ({error})") from error
    lora = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("lora/")}
    if not lora:
        raise _fail(path, "it holds no LoRA tensors")
    return TrainState(
        step=_int_field(path, record, "step"),
        epoch=_int_field(path, record, "epoch"),
        batch=_int_field(path, record, "batch"),
        lora=lora,
        optimizer=_optimizer_state(path, record, rest),
        scaler=record.get("scaler"),
        losses=_losses(path, record["losses"]),
        fingerprint=record["fingerprint"],
    )


def check_resumable(
    path: str | os.PathLike[str], state: TrainState, fingerprint: Mapping[str, Any]
) -> None:
    """A resume continues the same run: every fingerprint entry must match.

    Raises:
        TrainStateError: names each setting that differs, with both values.
    """
    saved = state.fingerprint
    fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True))
    differing = [
        f"{key}: saved {saved.get(key)!r}, now {value!r}"
        for key, value in fingerprint.items()
        if saved.get(key) != value
    ]
    if differing:
        raise TrainStateError(
            f"training state {str(path)!r} is from a different run ({'; '.join(differing)}); "
            "resume with the settings and data it was saved with"
        )
    if len(state.losses) != state.step:
        raise TrainStateError(
            f"training state {str(path)!r}: {len(state.losses)} loss records for step "
            f"{state.step}; the file is inconsistent"
        )


def fingerprint(settings: Any, data: Any) -> dict[str, Any]:
    """What a resume must share with the run it continues (not the length of the run)."""
    keys = (
        "clip_skip", "network", "rank", "alpha", "conv_rank", "conv_alpha", "train_unet",
        "train_text_encoder", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
        "lr_warmup_steps", "weight_decay", "max_grad_norm", "gradient_accumulation_steps",
        "mixed_precision", "min_snr_gamma", "noise_offset", "resolution", "enable_bucket",
        "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
        "batch_size", "seed", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
        "caption_tag_dropout_rate", "caption_separator", "flip_aug",
    )  # fmt: skip
    found = {key: getattr(settings, key) for key in keys}
    found["resolution"] = list(settings.resolution)
    found["dataset_dirs"] = data.dataset_dirs
    found["num_train_images"] = data.num_train_images
    return found


class RunFiles:
    """What a run writes beside ``settings.output`` (``OUT = <folder>/<stem>.safetensors``):

    - every ``save_every`` steps: ``<stem>-step00000100.safetensors`` (kohya's name) and
      ``<stem>-step00000100.trainstate``; every ``save_every_epochs`` epochs:
      ``<stem>-000002.safetensors`` and ``<stem>-000002.trainstate``;
    - ``<stem>-loss.csv`` and ``<stem>-loss.png``, rewritten at each save and at the end;
    - samples in ``<stem>-samples/``; latents in ``<stem>-latents/`` (or
      ``latent_cache_dir``; a temporary folder without an output or ``cache_latents``).

    The ss_* metadata is made once at the start (as kohya does) and completed at each save.
    """

    def __init__(self, components: Any, data: Any, buckets: Any, network: Any,
                 settings: Any, plan: dict[str, int]) -> None:  # fmt: skip
        from sdstack.train.buckets import bucket_info
        from sdstack.train.metadata import training_metadata

        self.components, self.data, self.network, self.settings = (
            components,
            data,
            network,
            settings,
        )
        self.total = plan["max_train_steps"]
        self.metadata = training_metadata(
            settings, data, **plan, bucket_info=bucket_info(buckets),
            model=components.path if components.path is not None else components.name,
            vae=components.vae_path, network_args=network.network_args,
        )  # fmt: skip
        out = settings.output
        self.folder = None if out is None else Path(out).parent
        self.stem = None if out is None else Path(out).stem
        self.saved: list[Path] = []
        self.states: list[Path] = []
        self.samples: list[Path] = []
        self.loss_csv: Path | None = None
        self.loss_plot: Path | None = None
        self._temporary: Any = None

    def _beside(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}{suffix}"

    def latent_source(self, components: Any, device: Any) -> Any:
        """``latents(batch, flips) -> (B, C, h, w)`` through the run's :class:`LatentCache`."""
        import tempfile

        from sdstack.train.latent_cache import LatentCache

        folder = self.settings.latent_cache_dir
        if folder is None and self.folder is not None and self.settings.cache_latents:
            folder = self._beside("-latents")
        if folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="sdstack-latents-")
            folder = self._temporary.name
        self.cache = cache = LatentCache(folder)
        vae = components.vae

        def latents(batch: Any, flips: list[bool]) -> torch.Tensor:
            # one image per VAE call: a latent must not depend on which images shared
            # the call (batched convolutions round differently), or a resumed run with a
            # fresh cache would drift from the uninterrupted one
            return torch.stack([
                cache.latents_for(image.item, image.bucket, flip, vae, resized=image.resized)
                for image, flip in zip(batch.images, flips, strict=True)
            ])  # fmt: skip

        return latents

    def _dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.settings.save_precision
        ]

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA now, in kohya keys and the save precision."""
        return self.network.state_dict_kohya(self._dtype())

    def _save(self, lora_path: Path, step: int, position: tuple[int, int], losses: list,
              optimizer: Any, scaler: Any, report: Any) -> None:  # fmt: skip
        from sdstack.train.metadata import save_metadata
        from sdstack.train.save import save_lora

        report("saving")
        epochs = position[0] + (1 if position[1] else 0)
        metadata = save_metadata(self.metadata, steps=step, epoch=epochs)
        self.saved.append(save_lora(lora_path, self.lora_tensors(), metadata).path)
        state = TrainState(
            step=step, epoch=position[0], batch=position[1],
            lora=self.network.state_dict_kohya(torch.float32),
            optimizer=optimizer.state_dict(),
            scaler=None if scaler is None else dict(scaler.state_dict()),
            losses=list(losses), fingerprint=fingerprint(self.settings, self.data),
        )  # fmt: skip
        state_path = lora_path.with_suffix(STATE_SUFFIX)
        self.states.append(save_train_state(state_path, state))
        self.write_loss_log(losses, plot=False)  # the plot (matplotlib) at the end

    def write_loss_log(self, losses: list, *, plot: bool = True) -> None:
        """The loss CSV and (``plot``) the plot; nothing without an output."""
        from sdstack.train.losslog import write_loss_csv, write_loss_plot

        if self.folder is None:
            return
        self.loss_csv = write_loss_csv(self._beside("-loss.csv"), losses)
        if plot:
            self.loss_plot = write_loss_plot(
                self._beside("-loss.png"), losses, title=f"{self.stem}: training loss"
            )

    def _sample(self, step: int, report: Any) -> None:
        from sdstack.train.samples import sample_images

        if not self.settings.sample_prompts:
            return
        report("sampling")
        self.samples += sample_images(
            self.components, self.settings, step=step, folder=self._beside("-samples"),
            name=self.stem,
        )  # fmt: skip

    def at_step(self, step: int, position: tuple[int, int], losses: list, optimizer: Any,
                scaler: Any, report: Any) -> None:  # fmt: skip
        """After optimizer step ``step``: save and sample when it is their turn."""
        every, sample_every = self.settings.save_every, self.settings.sample_every
        if every and step % every == 0:
            lora = self._beside(f"-step{step:08d}.safetensors")
            self._save(lora, step, position, losses, optimizer, scaler, report)
        if sample_every and step % sample_every == 0 and step < self.total:
            self._sample(step, report)

    def at_epoch_end(self, step: int, position: tuple[int, int], losses: list, optimizer: Any,
                     scaler: Any, report: Any) -> None:  # fmt: skip
        """After epoch ``position[0]`` (1-based count of epochs done) ended."""
        every, epoch = self.settings.save_every_epochs, position[0]
        if every and epoch % every == 0:
            lora = self._beside(f"-{epoch:06d}.safetensors")
            self._save(lora, step, position, losses, optimizer, scaler, report)

    def finish(self, step: int, position: tuple[int, int], losses: list, optimizer: Any,
               scaler: Any, report: Any, cancelled: bool) -> dict[str, Any]:  # fmt: skip
        """The final LoRA (or, cancelled, a save point to resume from), the loss log, the
        last samples; the temporary latent folder removed. Returns the result's fields."""
        from sdstack.train.metadata import save_metadata
        from sdstack.train.save import save_lora

        epochs = position[0] + (1 if position[1] else 0)
        tensors = self.lora_tensors()
        metadata = save_metadata(self.metadata, steps=step, epoch=epochs)
        output = None
        if self.folder is not None and cancelled and step > 0:
            lora = self._beside(f"-step{step:08d}.safetensors")
            if lora not in self.saved:
                self._save(lora, step, position, losses, optimizer, scaler, report)
            self.write_loss_log(losses)
        elif self.folder is not None and not cancelled:
            report("saving")
            saved = save_lora(self.settings.output, tensors, metadata)
            output, metadata = saved.path, saved.metadata
            self.write_loss_log(losses)
            self._sample(step, report)
        if self._temporary is not None:
            self._temporary.cleanup()
        return {"steps": step, "epochs": epochs, "tensors": tensors, "metadata": metadata,
                "output": output, "saved": self.saved, "states": self.states,
                "samples": self.samples, "loss_csv": self.loss_csv,
                "loss_plot": self.loss_plot, "cancelled": cancelled}  # fmt: skip
