"""Functions that run on every rank of a harness run (they must live in an importable module)."""

from __future__ import annotations

from typing import Any

import torch


def save_steps(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    steps: list[int],
    seed: int = 0,
    per_rank: tuple[str, ...] = (),
    timeout: float = 20.0,
    storage_options: dict | None = None,
    keep_last: int | None = None,
) -> dict[str, Any]:
    """Every rank builds the same model (replicated) and its own RNG stream, then saves at each step."""
    import helpers

    from dist_guardian import Guardian

    state = helpers.make_state(seed)
    torch.manual_seed(1000 + rank)
    state["data"] = {"position": 100 * rank}
    g = Guardian(
        stores=stores,
        run=run,
        timeout=timeout,
        per_rank=per_rank or ("data",),
        storage_options=storage_options,
        keep_last=keep_last,
    )
    out = []
    data = torch.Generator().manual_seed(seed)  # the same inputs on every rank: replicas stay identical
    for s in steps:
        helpers.train(state, 1, data)
        state["data"]["position"] += 1
        out.append(g.save(state, step=s).committed)
    left = g.close()
    return {"committed": out, "unmirrored": left, "next": helpers.next_randoms()}


def resume_state(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    timeout: float = 20.0,
    storage_options: dict | None = None,
    suspect: str = "after_same_step",
    on_exhausted: str = "fresh",
    seed: int = 42,
) -> dict[str, Any]:
    """Resume into a fresh state; report what was chosen and fingerprints of what was applied."""
    import helpers

    from dist_guardian import Guardian

    state = helpers.make_state(seed)
    state["data"] = {"position": -1}
    g = Guardian(
        stores=stores,
        run=run,
        timeout=timeout,
        per_rank=("data",),
        storage_options=storage_options,
        suspect=suspect,
        on_exhausted=on_exhausted,
    )
    r = g.resume(state)
    g.close()
    weights = {k: float(v.double().sum()) for k, v in state["model"].state_dict().items()}
    return {
        "resumed": r.resumed,
        "step": r.step,
        "path": r.path,
        "store": r.store,
        "tier": r.tier,
        "record": r.to_json(),
        "weights": weights,
        "data": state["data"],
        "next": helpers.next_randoms(),
        "optim_steps": [float(s["step"]) for s in state["optim"].state_dict()["state"].values()],
    }


def lower_layer_resume(
    rank: int, world: int, *, store: str, run: str, fail_step_on_rank1: int | None = None, timeout: float = 20.0
) -> dict[str, Any]:
    """``dist_guardian.resume`` driven directly with a ``torch.load`` load_fn, as a user of another library would."""
    import dist_guardian

    model = torch.nn.Linear(4, 2)
    applied: list[int] = []

    def load(c: Any, st: Any) -> dict[str, Any]:
        assert isinstance(st, dist_guardian.Store) and st.is_local
        if rank == 1 and c.step == fail_step_on_rank1:
            raise RuntimeError(f"rank 1 cannot load step {c.step}")
        with open(st.join(c.rel), "rb") as f:
            return torch.load(f, weights_only=True, map_location="cpu")

    def apply(c: Any, sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        applied.append(c.step)

    r = dist_guardian.resume(load, stores=[store], run=run, apply_fn=apply, timeout=timeout)
    return {
        "resumed": r.resumed,
        "step": r.step,
        "applied": applied,
        "weight_sum": float(model.weight.detach().sum()),
        "attempts": [(a.step, a.outcome) for a in r.attempts],
    }
