"""SnacGenerator: DAC's VQ losses, straight-through, quantizer dropout, SNAC compatibility, init/freeze,
codebook statistics and dead-code restarts."""

from __future__ import annotations

import copy

import pytest
import snac
import torch
import torch.nn.functional as F
from accelerate import PartialState

from snac_accel.config import MODEL_PRESETS
from snac_accel.hub import save_pretrained
from snac_accel.losses import MultiScaleMelLoss
from snac_accel.codebook import DeadCodeRestarter, code_counts, codebook_statistics
from snac_accel.model import build_generator, freeze, generator_from_pretrained

from .conftest import tiny_config

TINY = {**MODEL_PRESETS["tiny"], "noise": False}


@pytest.fixture(scope="module", autouse=True)
def accelerate_state():
    PartialState()  # accelerate's logger (used by the restarter) needs it, as inside a training


def tiny_model(seed: int = 0, quantizer_dropout: float = 0.0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator({**TINY, **overrides}, quantizer_dropout)


def audio_batch(batch: int = 2, length: int = 4096, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 24000
    tone = torch.sin(2 * torch.pi * 220 * t * (1 + torch.arange(batch)[:, None]))
    return (0.3 * tone + 0.05 * torch.randn(batch, length, generator=generator))[:, None]


def reference_vq(model, audio: torch.Tensor):
    """DAC's per-level losses computed plainly from the quantizer's weights (SNAC's cosine code search)."""
    z = model.encoder(model.preprocess(audio))
    residual = z
    codes, commitment, codebook = [], [], []
    for vq in model.quantizer.quantizers:
        x = F.avg_pool1d(residual, vq.stride) if vq.stride > 1 else residual
        z_e = vq.in_proj(x)  # [B, D, T]
        table = vq.codebook.weight  # [K, D]
        similarity = F.normalize(z_e.transpose(1, 2), dim=-1) @ F.normalize(table, dim=-1).T  # [B, T, K]
        idx = similarity.argmax(-1)
        z_q = table[idx].transpose(1, 2)  # [B, D, T]
        commitment.append(((z_e - z_q.detach()) ** 2).mean())
        codebook.append(((z_e.detach() - z_q) ** 2).mean())
        residual = residual - vq.out_proj(z_q).repeat_interleave(vq.stride, dim=-1)
        codes.append(idx)
    return codes, commitment, codebook


def test_vq_losses_match_a_direct_computation_from_the_quantizer_weights():
    model = tiny_model().train()
    audio = audio_batch()
    out = model(audio)
    codes, commitment, codebook = reference_vq(model, audio)
    for level in range(3):
        assert torch.equal(out.codes[level], codes[level])
        torch.testing.assert_close(out.commitment_per_level[level], commitment[level], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(out.codebook_per_level[level], codebook[level], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.commitment_loss, torch.stack(commitment).sum(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.codebook_loss, torch.stack(codebook).sum(), rtol=1e-5, atol=1e-8)
    assert out.commitment_loss > 0


def test_commitment_trains_the_encoder_and_codebook_loss_trains_the_codebook_only():
    model = tiny_model().train()
    out = model(audio_batch())
    out.commitment_loss.backward(retain_graph=True)
    assert all(vq.codebook.weight.grad is None for vq in model.quantizer.quantizers)
    assert model.encoder.block[0].parametrizations.weight.original1.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out.codebook_loss.backward()
    assert all(vq.codebook.weight.grad.abs().sum() > 0 for vq in model.quantizer.quantizers)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_mel_loss_reaches_the_encoder_through_the_straight_through_estimator():
    model = tiny_model().train()
    audio = audio_batch()
    out = model(audio)
    MultiScaleMelLoss(24000)(out.audio, audio).backward()
    first_conv = model.encoder.block[0].parametrizations.weight.original1.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    assert all(vq.in_proj.parametrizations.weight.original1.grad.abs().sum() > 0 for vq in model.quantizer.quantizers)
    # The mel loss never moves the codebook: its gradient stops at the straight-through estimator.
    assert all(vq.codebook.weight.grad is None for vq in model.quantizer.quantizers)


def level_contributions(model, z: torch.Tensor) -> list[torch.Tensor]:
    """Each level's z_q in eval mode, [B, C, T] per level."""
    contributions, residual = [], z
    for vq in model.quantizer.quantizers:
        z_q, _ = vq(residual)
        contributions.append(z_q)
        residual = residual - z_q
    return contributions


@torch.no_grad()
def test_quantizer_dropout_follows_dac():
    model = tiny_model(quantizer_dropout=1.0)
    z = torch.randn(16, model.latent_dim, 8)
    prefixes = torch.stack(level_contributions(model, z)).cumsum(0)  # [levels, B, C, T]: 1, 2, 3 levels

    model.eval()
    z_q, out = model.quantize(z)
    torch.testing.assert_close(z_q, prefixes[-1])

    model.train()
    torch.manual_seed(0)
    z_q, out = model.quantize(z)
    levels_used = []
    for sample in range(16):
        match = [k + 1 for k in range(3) if torch.allclose(z_q[sample], prefixes[k, sample], atol=1e-6)]
        assert len(match) == 1, match
        levels_used.append(match[0])
    assert min(levels_used) < 3 and set(levels_used) <= {1, 2, 3}
    # Dropped levels add nothing to the losses; the mean still divides by the whole batch.
    used = torch.tensor(levels_used)
    for level in range(3):
        vq = model.quantizer.quantizers[level]
        residual = z - (prefixes[level - 1] if level else 0)
        x = F.avg_pool1d(residual, vq.stride) if vq.stride > 1 else residual
        z_e = vq.in_proj(x)
        z_q_level, _ = vq.decode_latents(z_e)
        per_sample = ((z_e - z_q_level) ** 2).mean([1, 2])
        expected = (per_sample * (level < used).float()).sum() / 16
        torch.testing.assert_close(out.commitment_per_level[level], expected, rtol=1e-5, atol=1e-8)

    model.quantizer_dropout = 0.5
    torch.manual_seed(0)
    z_q, _ = model.quantize(z)
    torch.testing.assert_close(z_q[8:], prefixes[-1, 8:])  # only the first int(B * p) samples drop levels


@torch.no_grad()
def test_state_dict_loads_into_snac_strictly_and_gives_the_same_codes_and_audio():
    model = tiny_model().eval()
    reference = snac.SNAC(**model.config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    audio = audio_batch()
    ours = model(audio)
    ref_audio, ref_codes = reference(audio)
    assert all(torch.equal(a, b) for a, b in zip(ours.codes, ref_codes))
    assert all(torch.equal(a, b) for a, b in zip(model.encode(audio), reference.encode(audio)))
    torch.testing.assert_close(ours.audio, ref_audio, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", ["pytorch_model.bin", "model.safetensors"])
def test_init_from_a_folder_with_one_weights_file(tmp_path, keep):
    model = tiny_model(seed=3)
    save_pretrained(model, tmp_path)
    for name in ("pytorch_model.bin", "model.safetensors"):
        if name != keep:
            (tmp_path / name).unlink()
    loaded = generator_from_pretrained(str(tmp_path), quantizer_dropout=0.25)
    assert loaded.quantizer_dropout == 0.25 and loaded.config == model.config
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("noise_in_folder", [True, False])
@torch.no_grad()
def test_init_from_with_the_other_noise_setting_keeps_every_weight_in_place(tmp_path, noise_in_folder):
    """Noise blocks shift the decoder's layer indices: the weights must follow their layers, not names."""
    source = tiny_model(seed=4, noise=noise_in_folder).eval()
    for module in source.modules():  # a zero-gain noise block is the identity: outputs comparable
        if isinstance(module, snac.layers.NoiseBlock):
            module.linear.parametrizations.weight.original0.zero_()
    save_pretrained(source, tmp_path)
    loaded = generator_from_pretrained(str(tmp_path), noise=not noise_in_folder).eval()
    assert loaded.config["noise"] is (not noise_in_folder)
    audio = audio_batch()
    torch.testing.assert_close(loaded(audio).audio, source(audio).audio, rtol=1e-5, atol=1e-6)


def test_freeze_rejects_unknown_parts():
    with pytest.raises(ValueError, match="cannot freeze"):
        freeze(tiny_model(), "encoder,bottleneck")


def test_decoder_only_fine_tune_keeps_the_starting_codes(tmp_path, demo_dir):
    from snac_accel import train
    from snac_accel.data import audio_dataset_from_files, list_audio_files

    start = tiny_model(seed=5)
    save_pretrained(start, tmp_path / "start")
    final = train(tiny_config(tmp_path / "run", init_from=str(tmp_path / "start"), freeze="encoder,quantizer",
                              max_train_steps=3, checkpointing_steps=0, train_batch_size=2, segment_seconds=0.25,
                              max_validation_clips=1, validation_seconds=0.25))
    tuned = snac.SNAC.from_pretrained(str(final))
    start = snac.SNAC.from_pretrained(str(tmp_path / "start"))
    clip = audio_dataset_from_files(list_audio_files(demo_dir / "validation"), 24000)[0]["audio"]
    audio = clip.get_all_samples().data[None]  # [1, 1, T]
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(tuned.encode(audio), start.encode(audio)))
    before, after = start.state_dict(), tuned.state_dict()
    for name in before:
        if name.startswith(("encoder.", "quantizer.")):
            assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))


def test_codebook_statistics_from_known_codes():
    codes = [torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])]
    stats = codebook_statistics(codes, codebook_size=4)
    assert set(stats) == {f"codebook/{name}_level{level}" for name in ("usage", "perplexity", "efficiency")
                          for level in (0, 1)}
    torch.testing.assert_close(stats["codebook/usage_level0"], torch.tensor(0.5))
    torch.testing.assert_close(stats["codebook/perplexity_level0"], torch.tensor(2.0))
    torch.testing.assert_close(stats["codebook/efficiency_level0"], torch.tensor(0.5))  # 1 bit of log2(4) = 2
    torch.testing.assert_close(stats["codebook/usage_level1"], torch.tensor(1.0))
    torch.testing.assert_close(stats["codebook/perplexity_level1"], torch.tensor(4.0))
    torch.testing.assert_close(stats["codebook/efficiency_level1"], torch.tensor(1.0))

    # Two processes: the reduce function sums their histograms before any statistic is taken.
    other = [torch.tensor([[2, 3, 2, 3]]), torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0]])]
    summed = lambda counts: counts + code_counts(other, 4)  # noqa: E731 - stands for the all-reduce
    stats = codebook_statistics(codes, 4, reduce=summed)
    torch.testing.assert_close(stats["codebook/usage_level0"], torch.tensor(1.0))
    torch.testing.assert_close(stats["codebook/perplexity_level0"], torch.tensor(4.0))
    p = torch.tensor([10, 2, 2, 2]) / 16
    torch.testing.assert_close(stats["codebook/perplexity_level1"], torch.exp(-(p * p.log()).sum()))


def restart_run(seed: int):
    """Two optimizer steps with dead_steps=2 on a fixed batch; returns model, restarter, counts, output."""
    model = tiny_model(seed=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(audio_batch())
    (out.commitment_loss + out.codebook_loss).backward()
    optimizer.step()
    restarter = DeadCodeRestarter(n_levels=3, codebook_size=256, dead_steps=2, seed=seed)
    counts = code_counts(out.codes, 256)
    gathered = []
    gather = lambda t: gathered.append(t) or t  # noqa: E731 - one process: the gather is the identity
    restarter.observe(counts)
    logs = restarter.step(model, out.latents, step=0, gather=gather, optimizer=optimizer)
    assert {k: v.item() for k, v in logs.items()} == {f"codebook/restarted_level{level}": 0 for level in range(3)}
    before = {level: vq.codebook.weight.detach().clone() for level, vq in enumerate(model.quantizer.quantizers)}
    restarter.observe(counts)
    logs = restarter.step(model, out.latents, step=1, gather=gather, optimizer=optimizer)
    return model, restarter, counts, out, before, logs, optimizer, gathered


def test_dead_codes_are_reseeded_from_batch_latents_reproducibly():
    model, restarter, counts, out, before, logs, optimizer, gathered = restart_run(seed=7)
    assert len(gathered) == 6  # per level and update: which levels have dead codes is known on the device only
    for level, vq in enumerate(model.quantizer.quantizers):
        dead = counts[level] == 0
        assert logs[f"codebook/restarted_level{level}"].item() == int(dead.sum()) > 0
        weight = vq.codebook.weight.detach()
        assert torch.equal(weight[~dead], before[level][~dead])
        candidates = out.latents[level].transpose(1, 2).reshape(-1, weight.shape[1])
        for row in weight[dead]:
            assert (candidates == row).all(-1).any()
        assert (restarter.unused_steps[level] == 0).all()
        moments = optimizer.state[vq.codebook.weight]
        assert (moments["exp_avg"][dead] == 0).all() and (moments["exp_avg_sq"][dead] == 0).all()
        assert moments["exp_avg"][~dead].abs().sum() > 0

    again = restart_run(seed=7)[0]
    other = restart_run(seed=8)[0]
    for a, b, c in zip(model.quantizer.quantizers, again.quantizer.quantizers, other.quantizer.quantizers):
        assert torch.equal(a.codebook.weight, b.codebook.weight)
        assert not torch.equal(a.codebook.weight, c.codebook.weight)


def test_dead_code_restarter_ages_codes_and_checkpoints_its_state():
    restarter = DeadCodeRestarter(n_levels=3, codebook_size=256, dead_steps=3)
    model = tiny_model()
    model.quantizer.requires_grad_(False)  # a frozen codebook is never touched
    frozen = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    latents = [torch.randn(1, 8, 2)] * 3

    def counts(*used: int) -> torch.Tensor:
        values = torch.zeros(3, 256)
        values[:, list(used)] = 1.0
        return values

    restarter.observe(counts(0))
    restarter.observe(counts(1))  # accumulation: two micro-batches, one update
    restarter.step(model, latents, step=0)
    assert restarter.unused_steps[:, :4].tolist() == [[0, 0, 1, 1]] * 3
    state = copy.deepcopy(restarter.state_dict())
    restarter.observe(counts(2))
    restarter.step(model, latents, step=1)
    assert restarter.unused_steps[:, :4].tolist() == [[1, 1, 0, 2]] * 3
    logs = restarter.step(model, latents, step=2)
    assert restarter.unused_steps[:, :4].tolist() == [[2, 2, 1, 3]] * 3
    assert {v.item() for v in logs.values()} == {0}
    assert all(torch.equal(vq.codebook.weight, w) for vq, w in zip(model.quantizer.quantizers, frozen))
    restored = DeadCodeRestarter(n_levels=3, codebook_size=256, dead_steps=3)
    restored.load_state_dict(state)
    assert restored.unused_steps[:, :4].tolist() == [[0, 0, 1, 1]] * 3
    with pytest.raises(ValueError, match="levels"):
        DeadCodeRestarter(n_levels=2, codebook_size=256, dead_steps=3).step(model, latents, step=0)


def test_dead_codes_are_never_reseeded_from_non_finite_vectors():
    model = tiny_model()
    restarter = DeadCodeRestarter(n_levels=3, codebook_size=256, dead_steps=1)
    latents = [torch.full((1, 8, 4), float("nan")) for _ in range(3)]
    latents[1][0, :, 2] = torch.arange(8.0)
    before = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    logs = restarter.step(model, latents, step=0)
    assert logs["codebook/restarted_level0"].item() == 0 and logs["codebook/restarted_level1"].item() == 256
    assert torch.equal(model.quantizer.quantizers[0].codebook.weight, before[0])
    assert (model.quantizer.quantizers[1].codebook.weight == torch.arange(8.0)).all()


TWO_PROCESS_SCRIPT = r'''
import json, sys
import torch
from accelerate import Accelerator
from snac_accel.config import MODEL_PRESETS
from snac_accel.codebook import DeadCodeRestarter, code_counts, codebook_statistics
from snac_accel.model import build_generator

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = build_generator({**MODEL_PRESETS["tiny"], "noise": False})
generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # each process its own batch
audio = 0.1 * torch.randn(2, 1, 4096, generator=generator)
with torch.no_grad():
    out = model(audio)
counts = code_counts(out.codes, 256, reduce=lambda t: accelerator.reduce(t, "sum"))
stats = codebook_statistics(out.codes, 256, counts=counts)
restarter = DeadCodeRestarter(3, 256, dead_steps=1, seed=3)
restarter.observe(counts)
logs = restarter.step(model, out.latents, step=5, gather=accelerator.gather)
weights = accelerator.gather(torch.cat([vq.codebook.weight.detach().flatten() for vq in model.quantizer.quantizers])[None])
codes = [accelerator.gather(c) for c in out.codes]
latents = [accelerator.gather(z) for z in out.latents]
if accelerator.is_main_process:
    torch.save(dict(weights=weights, codes=codes, latents=latents, stats=stats, logs=logs,
                    rows=[vq.codebook.weight.detach() for vq in model.quantizer.quantizers]), sys.argv[1])
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # gloo threads left running abort the process at exit
'''


def test_two_processes_reduce_statistics_and_restart_identical_codes(tmp_path):
    """gloo on CPU: summed histograms, gathered candidates, the same re-seeded rows on both replicas."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "out.pt")],
                   check=True, env=env, timeout=600)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(result["weights"][0], result["weights"][1])
    expected = codebook_statistics(result["codes"], 256)
    for key, value in expected.items():
        torch.testing.assert_close(result["stats"][key], value)
    for level, rows in enumerate(result["rows"]):
        dead = torch.bincount(result["codes"][level].flatten(), minlength=256) == 0
        assert result["logs"][f"codebook/restarted_level{level}"].item() == int(dead.sum()) > 0
        candidates = result["latents"][level].transpose(1, 2).reshape(-1, rows.shape[1])
        matches = (rows[dead][:, None] == candidates[None]).all(-1)  # [dead, candidates]
        assert matches.any(-1).all()
    # Candidates come from both processes' batches (the second half of the gathered latents is rank 1's).
    first = result["latents"][0]
    half = first.shape[0] // 2 * first.shape[-1]
    picked = (result["rows"][0][:, None] == first.transpose(1, 2).reshape(-1, first.shape[1])[None]).all(-1)
    assert picked[:, :half].any() and picked[:, half:].any()


def test_bf16_autocast_leaves_the_output_waveform_in_float32():
    # The last conv and tanh in bf16 would round every sample to bf16's grid: a floor for the mel loss.
    model = tiny_model()
    audio = audio_batch()
    with torch.no_grad():
        plain = model(audio).audio
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(audio).audio
    assert plain.dtype == mixed.dtype == torch.float32
    assert (mixed != mixed.bfloat16().float()).float().mean() > 0.9  # not on the bf16 grid
    assert (mixed - plain).abs().max() < 0.05  # the same waveform, up to the bf16 body's rounding
