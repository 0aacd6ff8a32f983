"""DP-SGD machinery around Opacus: Poisson batches, the wrapped model/optimizer, one private step, cleanup.

Only the trainable adapter parameters are wrapped. A worker's cached model is shared by every
client it runs, so Opacus's hooks are removed after each client (`release`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from fedpeft.config import Config
from fedpeft.causal_lm import batch_loss
from fedpeft.data.prepared import collate, label_column

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def poisson_loader(ds, q: float, pad_id: int, generator: torch.Generator) -> DataLoader:
    """Batches drawn by Poisson sampling at rate q (Opacus's sampler); an empty draw yields None."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    ids, labels = list(ds["input_ids"]), list(ds[label_column(ds)])

    def collate_rows(sel: list[int]) -> dict[str, torch.Tensor] | None:
        return collate([ids[i] for i in sel], [labels[i] for i in sel], pad_id) if sel else None

    sampler = UniformWithReplacementSampler(num_samples=len(ids), sample_rate=q, generator=generator)
    return DataLoader(list(range(len(ids))), batch_sampler=sampler, collate_fn=collate_rows)


def expected_batch_size(loader: DataLoader) -> float:
    """q·n of a `poisson_loader`: the expected batch size a DP-SGD step's noisy sum is divided by."""
    sampler = loader.batch_sampler
    return float(sampler.sample_rate) * int(sampler.num_samples)


def make_private(model, optimizer, loader: DataLoader, cfg: Config, noise_multiplier: float, noise_gen=None):
    """Opacus-wrap (model, optimizer): returns (dp_model, dp_optimizer, criterion or None).

    The optimizer divides the noised sum of clipped gradients by the expected batch size q·n.
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": the simulation is seeded on purpose
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.dp.max_grad_norm, poisson_sampling=False,  # the loader already samples Poisson
            grad_sample_mode=cfg.dp.grad_sample_mode, criterion=torch.nn.CrossEntropyLoss(),
            noise_generator=noise_gen,
        )
    if cfg.dp.grad_sample_mode == "ghost":
        dp_model, opt, criterion, _ = out
    else:
        (dp_model, opt, _), criterion = out, None
    # With poisson_sampling=False Opacus takes the rate from the loader's length, 1/int(1/q), and
    # divides by int(n / int(1/q)): 30 instead of q·n = 16 for n = 30 and batch 16 (17 for n = 120).
    # A Poisson batch holds q·n examples in expectation, so the noisy sum over q·n is the unbiased
    # mean gradient; any other divisor rescales both the step and its noise.
    opt.expected_batch_size = expected_batch_size(loader)
    return dp_model, opt, criterion


def dp_step(dp_model, opt, criterion, batch: dict[str, torch.Tensor], loss_fn: LossFn = batch_loss,
            adjust: Callable[[], None] | None = None) -> float:
    """One DP-SGD step: per-sample clip, noise, then `adjust` (a data-independent gradient change), then step.

    `adjust` runs on the privatized gradient, so whatever it adds costs no privacy.
    """
    if criterion is None:
        loss = loss_fn(dp_model, batch)
    else:  # ghost clipping: the wrapped criterion runs both backward passes itself
        logits = dp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = criterion(logits, batch["labels"])
    loss.backward()
    if opt.pre_step():
        if adjust is not None:
            adjust()
        opt.original_optimizer.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def noise_step(opt, adjust: Callable[[], None] | None = None) -> None:
    """The DP-SGD step of an empty Poisson draw: Gaussian noise alone, scaled like any step's noised sum.

    Skipping the step instead would show in the released adapter that this draw held no example,
    which depends on who is in the data; the accountant already counts the draw as a step.
    """
    from opacus.optimizers.optimizer import _generate_noise

    for p in opt.params:
        noise = _generate_noise(std=opt.noise_multiplier * opt.max_grad_norm, reference=p,
                                generator=opt.generator, secure_mode=opt.secure_mode)
        p.grad = noise.view_as(p) / opt.expected_batch_size
    if adjust is not None:
        adjust()
    opt.original_optimizer.step()
    opt.zero_grad(set_to_none=True)


def release(dp_model, params: list[torch.nn.Parameter]) -> None:
    """Remove Opacus's hooks and per-parameter attributes so the cached model is plain again."""
    dp_model._close()
    for p in params:
        p.grad = None
