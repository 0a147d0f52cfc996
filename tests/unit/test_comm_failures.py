"""A failed collective is a timeout or a lost peer by its type first, by gloo's text only where torch gives no type."""

from __future__ import annotations

import torch.distributed as dist

from dist_guardian.comm import Comm
from dist_guardian.errors import AgreementTimeout, CoordinationError

# What gloo (torch 2.13) raises, measured with two ranks: a plain RuntimeError in both cases.
GLOO_TIMEOUT = (
    "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation to complete"
)
GLOO_DEAD_PEER = (
    "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:54934. "
    "This is typically caused by a remote worker crashing."
)


def _failed(e: BaseException) -> CoordinationError:
    comm = Comm(5.0)
    err = comm._fail("vote on x", e)
    assert comm.broken == "vote on x"
    return err


def test_a_builtin_timeout_error_is_an_agreement_timeout_whatever_it_says():
    assert type(_failed(TimeoutError("no words of it here"))) is AgreementTimeout


def test_gloo_timeout_and_dead_peer_are_told_apart():
    err = _failed(RuntimeError(GLOO_TIMEOUT))
    assert type(err) is AgreementTimeout
    assert "no answer from every rank within 5.0s" in str(err)
    err = _failed(RuntimeError(GLOO_DEAD_PEER))
    assert type(err) is CoordinationError and "a peer failed or died" in str(err)


def test_torch_dist_errors_are_runtime_errors_read_the_same_way():
    assert type(_failed(dist.DistBackendError(GLOO_TIMEOUT))) is AgreementTimeout
    assert type(_failed(dist.DistNetworkError(GLOO_DEAD_PEER))) is CoordinationError


def test_a_value_error_is_never_a_timeout():
    assert type(_failed(ValueError("timeout must be positive"))) is CoordinationError
