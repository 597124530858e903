"""--torch_compile: a compiled run trains without recompiling, resumes bit-identically, and checkpoints and
exports the plain `snac.SNAC` weights an eager run would."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file
from snac import SNAC
from torch._dynamo.utils import counters

from snac_accel.arguments import parse_args
from snac_accel.config import ConfigError
from snac_accel.model import build_generator, generator_from_pretrained
from snac_accel.trainer import SnacTrainer
from snac_accel.validation import Validator

from .conftest import tiny_config
from .helpers import assert_identical, custom_states, optimizer_states


# inductor generates and compiles C++ kernels: about 8.5 minutes for this test on 2 loaded cores, too much
# for the suite's 15. aot_eager captures the same graphs (dynamo, AOT autograd) without generating code.
# SNAC_TEST_COMPILE_BACKEND=inductor runs the test with inductor.
BACKEND = os.environ.get("SNAC_TEST_COMPILE_BACKEND", "aot_eager")


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_run_resumes_bit_identically_and_exports_plain_snac_weights(tmp_path):
    # Straight, cut and resumed runs in one process: the compile caches make the later compiles cheap.
    # Noise, quantizer dropout, EMA and dead-code restarts on: their random draws and states must
    # come back exactly. Validation (1 s clips, another length than training's, eval mode) runs at each
    # run's end on the compiled generator itself (export_use_ema off: the EMA's copy is not compiled).
    common = dict(torch_compile=True, torch_compile_backend=BACKEND, segment_seconds=0.25, train_batch_size=2,
                  checkpointing_steps=2, model_noise=True, quantizer_dropout=0.5, ema_decay=0.9, dead_code_steps=2,
                  max_validation_clips=2, export_use_ema=False)
    straight = SnacTrainer(tiny_config(tmp_path / "straight", max_train_steps=4, **common))
    graphs_at_step = []
    train_step = straight.train_step
    straight.train_step = lambda real: (train_step(real), graphs_at_step.append(graphs_compiled()))[0]
    final = straight.fit()
    # The first update runs eagerly to count its FLOPs (compiled graphs hide their ops), then all compiled.
    assert graphs_at_step[0] == 0 and straight.state.extra["flops_per_update"] > 0
    assert graphs_at_step[1] > 0, "nothing was compiled"
    assert graphs_at_step[1:] == [graphs_at_step[1]] * 3, "a training step after the second compiled new graphs"
    assert graphs_compiled() == graphs_at_step[-1], "validation or export compiled graphs"

    SnacTrainer(tiny_config(tmp_path / "cut", max_train_steps=2, **common)).fit()
    resumed = SnacTrainer(tiny_config(tmp_path / "cut", max_train_steps=4, resume_from_checkpoint="latest", **common))
    resumed.fit()
    a, b = tmp_path / "straight/checkpoints/checkpoint_4", tmp_path / "cut/checkpoints/checkpoint_4"
    for name in ("model.safetensors", "model_1.safetensors"):
        assert_identical(load_file(a / name), load_file(b / name), name)
    assert_identical(optimizer_states(a), optimizer_states(b), "optimizer state")
    # The validation records differ by design: the cut run validated at its end (step 2), the straight one did not.
    records = ("best_val_mel", "best_step")
    x, y = custom_states(a), custom_states(b)
    for states in (x, y):
        states["train_state"] = {k: v for k, v in states["train_state"].items() if k not in records}
        states["train_state"]["extra"] = {k: v for k, v in states["train_state"]["extra"].items()
                                          if k not in ("last_metrics", "best_metrics")}
    assert_identical(x, y, "EMA, restarter, schedulers, train state")

    # Checkpoints hold the eager generator's keys (no '_orig_mod.'); the export is plain snac.SNAC.
    plain_keys = build_generator(straight.config.model_config).state_dict().keys()
    assert load_file(a / "model.safetensors").keys() == plain_keys
    exported = SNAC.from_pretrained(str(final))
    assert_identical(exported.state_dict(), straight.unwrapped_generator.state_dict(), "exported weights")
    # Validation through the compiled module (run eagerly) gives the exported folder's metrics, eager.
    validator = Validator(straight.val_batch, straight.accelerator, straight.mel_loss, straight.config.sampling_rate,
                          straight.codebook_size, straight.config.seed)
    # (the run's last validation adds ViSQOL, PESQ and STOI, `--quality_metrics_steps`; compared without them)
    metrics, last = validator(generator_from_pretrained(str(final)), 4), straight.state.extra["last_metrics"]
    assert metrics == {k: v for k, v in last.items() if k in metrics}
    assert set(last) - set(metrics) == {"val/visqol", "val/pesq_wb", "val/stoi"}


@pytest.mark.parametrize("args,message", [
    (["--torch_compile", "--torch_compile_backend", "nope"], "--torch_compile_backend nope is not one of"),
    (["--torch_compile", "--torch_compile_mode", "fastest"], "invalid choice"),
    (["--torch_compile", "--torch_compile_models", "generator,critic"], "--torch_compile_models generator,critic:"),
])
def test_bad_compile_options_are_refused(demo_dir, args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--train_data_dir", str(demo_dir / "train"), "--report_to", "none", *args])


def test_accelerate_dynamo_backend_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(ConfigError, match="dynamo_backend INDUCTOR: its wrapper renames"):
        SnacTrainer(tiny_config(tmp_path))
    assert not (tmp_path / "run.lock").exists()


def test_generator_forward_with_its_losses_is_one_graph():
    # snac's hop_length is a numpy.int64: math.ceil on it in `preprocess` broke the graph in three.
    import torch

    from snac_accel.config import MODEL_PRESETS
    from snac_accel.losses import MultiScaleMelLoss

    torch.manual_seed(0)
    generator = build_generator({**MODEL_PRESETS["tiny"], "noise": False})
    mel = MultiScaleMelLoss(24000)

    def losses(real):
        out = generator(real)
        return 15 * mel(out.audio, real) + 0.25 * out.commitment_loss + out.codebook_loss

    explained = torch._dynamo.explain(losses)(0.1 * torch.randn(2, 1, 6000))
    assert [str(b.reason) for b in explained.break_reasons] == []
    assert explained.graph_count == 1
