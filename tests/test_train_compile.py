"""run.compile=true: the model, with our ops inside, under torch.compile(fullgraph=True).

Contract: no graph break (fullgraph would raise), no recompile across curriculum
stages (c and N change every stage; neither enters the model), and the same losses
as the eager trainer to float tolerance."""

import pytest
import torch

pytest.importorskip("sklearn")

from lct_kernels.train.config import build_config  # noqa: E402
from lct_kernels.train.loop import Trainer  # noqa: E402


def _overrides(cache_dir, compile_):
    items = {
        "data.cache_dir": str(cache_dir), "data.ae_steps": 150,
        "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
        "optim.batch_size": 32, "optim.warmup_steps": 0,
        # s0=10 -> s1=40: three stages of 2 steps each
        "objective.s0": 10, "objective.s1": 40,
        "run.steps": 6, "run.log_every": 1, "run.ckpt_every": 1000, "run.n_samples": 10,
        "run.progress": False, "run.tensorboard": False, "run.device": "cpu",
        "run.compile": compile_,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.compile
def test_compiled_trainer_never_retraces_across_stages_and_matches_eager(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lct_cache_compile")
    runs = {}
    for compile_ in (False, True):
        cfg = build_config("demo", overrides=_overrides(cache, compile_))
        t = Trainer(cfg, tmp_path_factory.mktemp(f"run{compile_}"))
        losses, stages = [t.train_step()["loss"]], [t.intervals(0)]
        # the first step compiled the training graph and the teacher's no_grad graph:
        # from here on any recompile is an error
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(cfg.run.steps - 1):
                stages.append(t.intervals(t.step))
                losses.append(t.train_step()["loss"])
        runs[compile_] = losses
        assert stages == [10, 10, 20, 20, 40, 40]  # three curriculum stages were crossed
        assert (t.compiled is not None) == compile_
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)
