"""The Flower internals fedpeft relies on are all there, and a patch steps aside when Flower changes."""

from __future__ import annotations

import flwr
import pytest

from fedpeft.app.engine import dispatch, flower, workers


def test_installed_flower_matches_every_internal() -> None:
    """Fails, naming each one, when a Flower upgrade moved, renamed or re-signed an internal fedpeft uses."""
    found = flower.problems()
    assert found == [], "Flower changed underneath fedpeft:\n  " + "\n  ".join(found)


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gone attribute and a lost parameter are each reported with the Flower path."""
    group = dict(flower.INTERNALS["dispatch"])
    group["now"] = flower.Internal("flwr.supercore.date", "no_such_function")
    group["add_messages_to_queue"] = flower.Internal(
        "flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue", ("state", "renamed_param"))
    monkeypatch.setitem(flower.INTERNALS, "dispatch", group)
    found = flower.problems("dispatch")
    assert any("flwr.supercore.date.no_such_function is gone" in p for p in found)
    assert any("lost parameter(s) renamed_param" in p for p in found)


def test_patches_stand_aside_on_another_flower_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a Flower release they were not written for, the dispatcher and worker recovery keep Flower's own."""
    vce_api = pytest.importorskip("flwr.server.superlink.fleet.vce.vce_api")
    raybackend = pytest.importorskip("flwr.server.superlink.fleet.vce.backend.raybackend")
    flowers_dispatch, flowers_backend = vce_api.add_messages_to_queue, raybackend.RayBackend
    with dispatch.fast_dispatch(), workers.worker_recovery():
        assert vce_api.add_messages_to_queue is dispatch.dispatch_messages
        assert raybackend.RayBackend is not flowers_backend and issubclass(raybackend.RayBackend, flowers_backend)
    assert vce_api.add_messages_to_queue is flowers_dispatch and raybackend.RayBackend is flowers_backend

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    assert flower.problems()[0].startswith("flwr 9.9.9 is installed")
    with dispatch.fast_dispatch(), workers.worker_recovery():
        assert vce_api.add_messages_to_queue is flowers_dispatch
        assert raybackend.RayBackend is flowers_backend
