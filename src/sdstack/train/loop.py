"""LoRA training as kohya sd-scripts ``train_network.py`` runs it, for SD1.x.

Per optimizer step (``gradient_accumulation_steps`` micro-batches of one bucket each):

1. latents ``z`` of the batch's images (VAE, cached on disk), captions processed
   (shuffle, keep tokens, dropout) and encoded at the run's clip skip exactly as
   generation does (``sdstack.text.clip_skip.clip_skip_output``: the last layer, or the
   final LayerNorm of ``hidden_states[-N]``), with gradients when the text encoder trains;
2. ``eps = randn``, ``eps += noise_offset * randn(B, C, 1, 1)``, ``t ~ U{0..999}``,
   ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` (``DDPMScheduler.add_noise``);
3. loss per sample ``mean((unet(z_t, t, c) - eps)^2)`` (``v`` for v-prediction models),
   times the min-SNR weight ``min(snr_t, gamma) / snr_t`` (``/(snr_t + 1)`` for v),
   ``snr_t = abar_t / (1 - abar_t)``; the batch mean over the step's micro-batches;
4. gradient clip to ``max_grad_norm``, learning rates from the schedule (separate UNet
   and text-encoder groups), AdamW step.

Randomness: every generator derives from ``(seed, epoch, batch)``: the batch order of an
epoch from ``(seed, epoch)``, captions, flips, noise and timesteps of a micro-batch from
``(seed, epoch, batch)``, all drawn on the CPU. A run is therefore the same on any
device order and a resumed run (``sdstack.train.state``) continues exactly.
"""

from __future__ import annotations

import hashlib
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdstack.errors import SdstackError, SdstackWarning
from sdstack.train.losslog import LossRecord
from sdstack.train.settings import TrainSettings, check_train_settings, learning_rate_factor
from sdstack.train.state import TrainState

ProgressCallback = Callable[["TrainProgress"], None]


class TrainingError(SdstackError):
    """A run that cannot start or continue (no images, a non-finite loss, a bad resume)."""


@dataclass(frozen=True)
class TrainProgress:
    """One report of a run: ``phase`` is "training" (after each step), "sampling" or
    "saving" (before that work), ``step`` of ``total`` optimizer steps done."""

    phase: str
    step: int
    total: int
    epoch: int
    loss: float | None = None
    lr_unet: float = 0.0
    lr_text_encoder: float = 0.0
    elapsed: float = 0.0


@dataclass
class TrainResult:
    """What a run made.

    Attributes:
        steps, total_steps: optimizer steps done (this run and before a resume) / asked.
        epochs: epochs started; losses: one record per step (resumed ones included).
        tensors: the final LoRA in kohya keys (``save_precision``); metadata: its ss_* keys.
        output: the LoRA file written (None without ``settings.output``).
        saved, states, samples: intermediate LoRAs, training states, sample images.
        loss_csv, loss_plot: the loss log and plot (None without an output).
        cancelled: ``cancel`` stopped the run (a state was saved when there is an output).
    """

    settings: TrainSettings
    steps: int
    total_steps: int
    epochs: int
    losses: list[LossRecord]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    output: Path | None = None
    saved: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    loss_csv: Path | None = None
    loss_plot: Path | None = None
    cancelled: bool = False


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts`` (sha256 of their text), stable everywhere."""
    text = ":".join(str(part) for part in ("sdstack-train", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def encode_captions(
    text_encoder: Any, tokenizer: Any, captions: list[str], clip_skip: float
) -> torch.Tensor:
    """kohya's ``get_hidden_states`` for SD1 (``max_token_length`` None): ids padded and
    truncated to 77, then the conditioning at ``clip_skip`` through the same
    ``clip_skip_output`` as generation (last layer, or ``final_layer_norm(hidden[-N])``).
    Gradients flow when the caller enables them."""
    from sdstack.text.clip_skip import clip_skip_output, final_layer_norm

    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    want_hidden = clip_skip != 1
    output = text_encoder(input_ids=ids, output_hidden_states=want_hidden)
    hidden = output.hidden_states if want_hidden else ()
    return clip_skip_output(
        hidden, output.last_hidden_state, final_layer_norm(text_encoder), clip_skip
    )


def min_snr_weight(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, kohya ``apply_snr_weight``): ``snr = abar/(1-abar)``,
    weight ``min(snr, gamma) / snr`` (epsilon) or ``min(snr, gamma) / (snr + 1)`` (v)."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


@dataclass
class _Run:
    """Everything one micro-batch needs."""

    components: Any
    settings: TrainSettings
    data: Any
    buckets: Any
    network: Any
    noise_scheduler: Any
    latents: Callable[[Any, list[bool]], torch.Tensor]
    device: torch.device
    autocast: Any
    scaler: Any = None


def _autocast(settings: TrainSettings, device: torch.device) -> tuple[Any, Any]:
    """(autocast context factory, GradScaler or None): mixed precision on CUDA only."""
    if settings.mixed_precision == "no":
        return nullcontext, None
    if device.type != "cuda":
        warnings.warn(
            f"mixed precision {settings.mixed_precision} is for CUDA; training on "
            f"{device.type} in fp32",
            SdstackWarning,
            stacklevel=3,
        )
        return nullcontext, None
    dtype = torch.float16 if settings.mixed_precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _micro_loss(run: _Run, batch: Any, epoch: int, index: int) -> torch.Tensor:
    """The loss of one micro-batch (module docstring, steps 1-3)."""
    from sdstack.train.captions import process_caption

    s = run.settings
    rng = random.Random(derived_seed(s.seed, "batch", epoch, index))
    generator = torch.Generator().manual_seed(derived_seed(s.seed, "noise", epoch, index))
    flips = [s.flip_aug and rng.random() < 0.5 for _ in batch.images]
    captions = [
        process_caption(
            image.item.caption, rng, shuffle=s.shuffle_caption, keep_tokens=s.keep_tokens,
            dropout_rate=s.caption_dropout_rate, tag_dropout_rate=s.caption_tag_dropout_rate,
            separator=s.caption_separator,
        )
        for image in batch.images
    ]  # fmt: skip
    latents = run.latents(batch, flips).to(run.device, torch.float32)
    noise = torch.randn(latents.shape, generator=generator)
    if s.noise_offset:
        noise += s.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    steps = run.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
    noise, timesteps = noise.to(run.device), timesteps.to(run.device)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    components = run.components
    grad = torch.enable_grad() if s.train_text_encoder else torch.no_grad()
    with run.autocast():
        with grad:
            context = encode_captions(
                components.text_encoder, components.tokenizer, captions, s.effective_clip_skip
            )
        prediction = components.unet(noisy, timesteps, context).sample
    v_prediction = run.noise_scheduler.config.prediction_type == "v_prediction"
    target = run.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    loss = loss.mean(dim=(1, 2, 3))
    if s.min_snr_gamma is not None:
        alphas = run.noise_scheduler.alphas_cumprod
        loss = loss * min_snr_weight(alphas, timesteps, s.min_snr_gamma, v_prediction)
    return loss.mean()


def _optimizer_step(
    run: _Run, optimizer: Any, group: list[Any], epoch: int, first: int, lrs: tuple[float, float]
) -> float:
    """Steps 1-4 over ``group`` (micro-batches ``first ...`` of ``epoch``); the mean loss."""
    total = 0.0
    for offset, batch in enumerate(group):
        loss = _micro_loss(run, batch, epoch, first + offset)
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"the loss became {value} at epoch {epoch + 1}, batch {first + offset + 1}; "
                "lower the learning rate, or use bf16 / fp32 instead of fp16"
            )
        scaled = loss / len(group)
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        total += value
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)
    if run.settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, run.settings.max_grad_norm)
    for param_group, lr in zip(optimizer.param_groups, lrs, strict=True):
        param_group["lr"] = lr
    if run.scaler is not None:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(group)


def _make_optimizer(network: Any, settings: TrainSettings) -> Any:
    """AdamW over two groups, UNet then text encoder (kohya's ``prepare_optimizer_params``),
    an empty group kept so the group order (and a state's layout) never changes."""
    groups = [
        {"params": network.parameters_unet(), "lr": settings.unet_learning_rate},
        {"params": network.parameters_text_encoder(), "lr": settings.te_learning_rate},
    ]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _learning_rates(settings: TrainSettings, step: int, total: int) -> tuple[float, float]:
    factor = learning_rate_factor(settings, step, total)
    return settings.unet_learning_rate * factor, settings.te_learning_rate * factor


@contextmanager
def _training_mode(components: Any, settings: TrainSettings) -> Iterator[None]:
    """Freeze the model, train modes and checkpointing on; everything restored after."""
    modules = (components.unet, components.text_encoder, components.vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    modes = [m.training for m in modules]
    for module in modules:
        module.requires_grad_(False)
    checkpointing = settings.gradient_checkpointing
    if checkpointing:  # diffusers and transformers checkpoint only in train mode
        components.unet.train()
        components.unet.enable_gradient_checkpointing()
        if settings.train_text_encoder:
            components.text_encoder.train()
            _text_checkpointing(components.text_encoder, True)
    try:
        yield
    finally:
        if checkpointing:
            components.unet.disable_gradient_checkpointing()
            if settings.train_text_encoder:
                _text_checkpointing(components.text_encoder, False)
        for module, mode, saved in zip(modules, modes, flags, strict=True):
            module.train(mode)
            for param, flag in zip(module.parameters(), saved, strict=True):
                param.requires_grad_(flag)


def _text_checkpointing(model: Any, enable: bool) -> None:
    """transformers 5 ``activation_checkpointing_*`` (4.x: ``gradient_checkpointing_*``),
    non-reentrant so the LoRA weights inside get gradients."""
    if enable:
        method = getattr(model, "activation_checkpointing_enable", None)
        if method is not None:
            method(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        method = getattr(model, "activation_checkpointing_disable", None)
        (method or model.gradient_checkpointing_disable)()


def _cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if is_set is not None else cancel())


def _noise_scheduler(components: Any) -> Any:
    """kohya's ``DDPMScheduler`` over the model's noise schedule (scaled-linear on SD1)."""
    from diffusers import DDPMScheduler

    config = dict(components.scheduler_config)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return DDPMScheduler(**{k: config[k] for k in keys if k in config}, clip_sample=False)


def _check_data(data: Any) -> None:
    if data.num_train_images == 0:
        raise TrainingError(
            f"training data {str(data.folder)!r}: no readable images; expected images with "
            "caption files in N_concept subfolders (or in the folder itself)"
        )


def _resume(
    settings: TrainSettings, data: Any, network: Any, optimizer: Any, scaler: Any
) -> TrainState:
    """The state to start from: ``settings.resume`` loaded and checked, or step 0."""
    from sdstack.train.state import check_resumable, fingerprint, load_train_state

    if settings.resume is None:
        return TrainState(step=0, epoch=0, batch=0, lora={}, optimizer={})
    state = load_train_state(settings.resume)
    check_resumable(settings.resume, state, fingerprint(settings, data))
    network.load_state(state.lora)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise TrainingError(
            f"training state {str(settings.resume)!r}: its optimizer state does not fit this "
            f"network ({error})"
        ) from error
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    return state


def train_lora(
    components: Any,
    data: Any,
    settings: TrainSettings,
    *,
    progress: ProgressCallback | None = None,
    cancel: Any = None,
) -> TrainResult:
    """Train a kohya LoRA on ``data`` (module docstring for the step); save what is asked.

    The model trains where it is (``components`` on the device already; ``settings.device``
    is what the command line loads onto). Its weights are never changed: the LoRA is
    hooked in (``TrainableLora``) and taken out at the end, gradient flags, train/eval
    modes and checkpointing restored.

    Args:
        components: a loaded model (``sdstack.models.ModelComponents``), float32 weights.
        data: ``sdstack.train.scan_dataset(...)``.
        settings: the run (checked here first).
        progress: ``progress(TrainProgress)`` after each step and before saving/sampling.
        cancel: ``threading.Event``-like or callable, checked before each step; the run
            stops there, saving a training state when there is an output.

    Returns:
        A :class:`TrainResult`.

    Raises:
        SettingError, UnknownTrainOptionError: bad settings.
        TrainingError: no images, a non-finite loss, a state that does not fit.
        TrainStateError: an unreadable or foreign ``resume`` file.
    """
    from sdstack.train.batches import batches_per_epoch, steps_per_epoch
    from sdstack.train.buckets import BucketManager, assign_buckets
    from sdstack.train.network import TrainableLora

    # 1. Check the settings and the data, put the images into buckets.
    settings = check_train_settings(settings)
    _check_data(data)
    manager = BucketManager(
        settings.resolution, enable_bucket=settings.enable_bucket,
        min_size=settings.min_bucket_reso, max_size=settings.max_bucket_reso,
        steps=settings.bucket_reso_steps, no_upscale=settings.bucket_no_upscale,
    )  # fmt: skip
    buckets = assign_buckets(data, manager)
    per_epoch = steps_per_epoch(buckets, settings.batch_size, settings.gradient_accumulation_steps)
    total = settings.total_steps(per_epoch)
    plan = {
        "num_batches_per_epoch": batches_per_epoch(buckets, settings.batch_size),
        "max_train_steps": total,
        "num_epochs": -(-total // per_epoch),
    }
    # 2. The network, hooked in for the run and taken out after it.
    network = TrainableLora(
        components, rank=settings.rank, alpha=settings.alpha, network=settings.network,
        conv_rank=settings.conv_rank, conv_alpha=settings.conv_alpha,
        train_unet=settings.train_unet, train_text_encoder=settings.train_text_encoder,
        seed=derived_seed(settings.seed, "init"),
    )  # fmt: skip
    try:
        with _training_mode(components, settings):
            return _run_training(components, data, buckets, network, settings, plan,
                                 progress, cancel)  # fmt: skip
    finally:
        network.remove()


def _run_training(
    components: Any, data: Any, buckets: Any, network: Any, settings: TrainSettings,
    plan: dict[str, int], progress: ProgressCallback | None, cancel: Any,
) -> TrainResult:  # fmt: skip
    """Steps 3-5 of :func:`train_lora`: resume, the epochs, the final save."""
    from sdstack.train.batches import epoch_batches
    from sdstack.train.state import RunFiles

    device = next(components.unet.parameters()).device
    network.to(device)
    optimizer = _make_optimizer(network, settings)
    autocast, scaler = _autocast(settings, device)
    # 3. Resume, or start at step 0.
    state = _resume(settings, data, network, optimizer, scaler)
    files = RunFiles(components, data, buckets, network, settings, plan)
    run = _Run(components, settings, data, buckets, network, _noise_scheduler(components),
               files.latent_source(components, device), device, autocast, scaler)  # fmt: skip
    losses, step, total = list(state.losses), state.step, plan["max_train_steps"]
    started, epoch, accum = time.monotonic(), state.epoch, settings.gradient_accumulation_steps

    def report(phase: str, loss: float | None = None, lrs: tuple[float, float] = (0, 0)) -> None:
        if progress is not None:
            elapsed = time.monotonic() - started
            progress(TrainProgress(phase, step, total, epoch + 1, loss, *lrs, elapsed))

    # 4. Epochs of bucketed batches, one optimizer step per `accum` micro-batches.
    position, cancelled = (state.epoch, state.batch), False
    while step < total and not cancelled:
        epoch, begin = position
        batches = epoch_batches(
            data, buckets, settings.batch_size,
            random.Random(derived_seed(settings.seed, "epoch", epoch)),
        )  # fmt: skip
        while begin < len(batches) and step < total:
            if _cancelled(cancel):
                cancelled = True
                break
            lrs = _learning_rates(settings, step, total)
            group = batches[begin : begin + accum]
            loss = _optimizer_step(run, optimizer, group, epoch, begin, lrs)
            step, begin = step + 1, begin + len(group)
            position = (epoch, begin) if begin < len(batches) else (epoch + 1, 0)
            losses.append(LossRecord(step, epoch + 1, loss, *lrs))
            report("training", loss, lrs)
            files.at_step(step, position, losses, optimizer, scaler, report)
        if begin >= len(batches):
            files.at_epoch_end(step, position, losses, optimizer, scaler, report)
    # 5. The final LoRA, the loss log, samples and (cancelled) a state to resume from.
    fields = files.finish(step, position, losses, optimizer, scaler, report, cancelled)
    return TrainResult(settings=settings, total_steps=total, losses=losses, **fields)
