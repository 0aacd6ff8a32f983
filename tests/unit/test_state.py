"""The client state store keeps JSON state and tensor sets per client, written atomically."""

import numpy as np
import pytest

from fedpeft.state import ClientStateStore


def test_tensor_sets_round_trip_per_client(tmp_path):
    store = ClientStateStore(tmp_path / "client_state")
    assert store.load_arrays(3, "residual") == {}
    a = {"x.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([1.5], dtype=np.float32)}
    store.save_arrays(3, "residual", a)
    store.save_arrays(4, "residual", {"x.weight": np.zeros((2, 3), np.float32)})
    back = store.load_arrays(3, "residual")
    assert set(back) == set(a) and all(np.array_equal(back[k], a[k]) and back[k].dtype == a[k].dtype for k in a)
    assert store.load_arrays(4, "local") == {}
    assert not list((tmp_path / "client_state").glob(".client-*"))  # no temp file left behind


def test_tensor_set_name_is_checked(tmp_path):
    with pytest.raises(ValueError, match="tensor set name"):
        ClientStateStore(tmp_path).save_arrays(1, "../escape", {})
