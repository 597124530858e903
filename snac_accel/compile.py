"""``--torch_compile``: the generator and the discriminators compiled in place, everything beside them eager.

`nn.Module.compile` compiles a module's ``__call__`` and leaves the module itself alone: no
``_orig_mod.`` wrapper, so state dicts, checkpoints, `accelerator.unwrap_model` and the exported
`snac.SNAC` weights are the same as in an eager run. (accelerate's dynamo plugin wraps the models in
``OptimizedModule``, whose state-dict keys carry ``_orig_mod.``: checkpoints would no longer match
an eager run's.) Only calls of the compiled modules themselves go through the compiler; the codebook
seeding and the dead-code restarts reach submodules (``model.encoder``, the quantizer's weights) and
stay eager. Validation and exports run under `eager` so that eval mode and the validation clips'
length do not compile graphs that training never uses.

Shapes: training batches have one shape (the sampler drops the epoch's last partial batch), so after
the first updates nothing recompiles. A batch made smaller by skipped broken files compiles once more.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DynamoBackend

from .config import ConfigError

# Compiled graphs kept per forward's code object (torch's default: 8). The discriminator needs three
# per trainer (its own step, the generator's pass, the no-grad pass on real audio), and every
# trainer of a process (tests, notebooks) adds its own: past the limit dynamo runs it eagerly.
RECOMPILE_LIMIT = 32


def compile_models(modules: Sequence[torch.nn.Module], mode: str = "default", backend: str = "inductor") -> None:
    """Compile each module in place, after `accelerator.prepare` (DDP calls the compiled module).
    A copy drops the compilation (`nn.Module.__getstate__`): the EMA's copy runs eagerly."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in modules:
        module.compile(mode=mode if backend == "inductor" else None, backend=backend)


def refuse_accelerate_dynamo(accelerator: Accelerator) -> None:
    """accelerate's dynamo_backend (accelerate config, ACCELERATE_DYNAMO_BACKEND) would wrap the models."""
    backend = accelerator.state.dynamo_plugin.backend
    if backend != DynamoBackend.NO:
        raise ConfigError(f"the accelerate config sets dynamo_backend {backend.value}: its wrapper renames every "
                          "checkpoint and export key (_orig_mod.); set dynamo_backend to NO and use --torch_compile")


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run their plain forward inside this block (no compile, no recompile)."""
    with torch.compiler.set_stance("force_eager"):
        yield
