"""Deployment building blocks without a SuperLink: certificates, node keys, shards, node data, relay parsing, PIDs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedpeft.app.recipe import load
from fedpeft.data import DataError
from fedpeft.data.nodefile import load_node_data, node_task
from fedpeft.data.prepared import prepare
from fedpeft.app.deploy.certs import make_tls_files
from fedpeft.app.deploy.keys import make_node_keys
from fedpeft.app.deploy.processes import ProcessGroup, pid_alive
from fedpeft.app.deploy.shards import write_shards
from fedpeft.app.deploy.wirecheck import HttpStream, TlsStream, endpoint

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
SMALL = ["sim.num_clients=3", "sim.clients_per_round=3", "data.builtin.num_train=300", "data.builtin.num_test=60"]


def test_causal_lm_shards_are_instruction_records_a_node_reads_back_as_its_partition(tmp_path):
    cfg = load(ROOT / "simulations" / "llm-smoke.toml", [*SMALL, "partition.type=dirichlet", "partition.by=category"])
    task = prepare(cfg, tmp_path / "task")
    shards = write_shards(cfg, tmp_path / "shards")
    first = json.loads(shards[0].read_text().splitlines()[0])
    assert set(first) == {"instruction", "input", "output"}
    for cid, path in enumerate(shards):
        own = node_task(task, cfg, str(path), cid).client_dataset(cid)
        part = task.client_dataset(cid)
        assert own["input_ids"] == part["input_ids"] and own["labels"] == part["labels"]
        assert own["reference"] == part["reference"]


def test_tls_files_chain_to_the_ca_and_name_loopback(tmp_path):
    files = make_tls_files(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_node_keys_are_openssh_ecdsa_384_pairs(tmp_path):
    keys = make_node_keys(tmp_path / "node1")
    priv = load_ssh_private_key(keys.private.read_bytes(), None)
    pub = load_ssh_public_key(keys.public.read_bytes())
    assert isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert keys.public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_shards_hold_exactly_the_simulation_partitions(tmp_path):
    cfg = load(SMOKE, SMALL)
    task = prepare(cfg, tmp_path / "task")
    shards = write_shards(cfg, tmp_path / "shards")
    assert [p.name for p in shards] == ["client-0.jsonl", "client-1.jsonl", "client-2.jsonl"]
    for cid, path in enumerate(shards):
        own = load_node_data(str(path), cfg, task.label_names)
        part = task.client_dataset(cid)
        assert own["input_ids"] == part["input_ids"] and own["label"] == part["label"]
        nt = node_task(task, cfg, str(path), cid)
        assert len(nt.client_dataset(cid)) == len(part)
        with pytest.raises(DataError, match=f"holds client {cid}'s data"):
            nt.client_dataset(cid + 1)


def test_node_data_file_errors_name_the_problem(tmp_path):
    cfg = load(SMOKE, SMALL)
    names = ["restaurant-positive", "restaurant-negative"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"review": "the soup was good.", "label": "restaurant-positive"}) + "\n")
    with pytest.raises(DataError, match="column.*'text'"):
        load_node_data(str(bad), cfg, names)
    bad.write_text(json.dumps({"text": "the soup was good.", "label": "hotel-positive"}) + "\n")
    with pytest.raises(DataError, match="'hotel-positive' is not one of the run's classes"):
        load_node_data(str(bad), cfg, names)
    ok = tmp_path / "ok.csv"
    ok.write_text("text,label\nthe soup was good.,restaurant-positive\nthe soup was bad.,1\n")
    assert load_node_data(str(ok), cfg, names)["label"] == [0, 1]


def test_http_stream_splits_content_length_and_chunked_messages():
    s = HttpStream()
    req = b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    done = s.feed(req[:20]) + s.feed(req[20:] + chunked[:30]) + s.feed(chunked[30:])
    assert [m.body for m in done] == [b"hello", b"abcde"]
    assert done[0].head_bytes == len(req) - 5 and endpoint(done[0].start_line) == "push-object"
    assert done[1].wire_body_bytes == len(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


def test_tls_stream_counts_records_and_rejects_plain_http():
    t = TlsStream()
    t.feed(bytes([22, 3, 1, 0, 4]) + b"abcd" + bytes([23, 3, 3, 0, 20]) + b"x" * 10)
    t.feed(b"y" * 10)
    assert (t.records, t.app_records, t.handshake_bytes, t.app_record_bytes) == (2, 1, 9, 25)
    plain = TlsStream()
    plain.feed(b"POST / HTTP/1.1\r\n")
    assert plain.broken


def test_process_group_stops_processes_and_their_children_by_pid(tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    s = group.start("parent", ["bash", "-c", "sleep 300 & sleep 300 & wait"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        group.note_children()
        if len(group.seen_pids) >= 3:
            break
        time.sleep(0.1)
    pids = dict(group.seen_pids)
    assert len(pids) >= 3 and all(pid_alive(p, t) for p, t in pids.items())
    group.stop(grace=5)
    assert group.alive() == [] and s.proc.returncode is not None
    assert not any(pid_alive(p, t) for p, t in pids.items())


def test_client_runtime_trains_on_the_node_config_data_file(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from clients.app.runtime import client_id, runtime
    from fedpeft.data.nodefile import NodeTask

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    cfg = load(SMOKE, SMALL)
    shard = tmp_path / "mine.jsonl"
    shard.write_text("".join(json.dumps({"text": f"the soup was {w}.", "label": lab}) + "\n"
                             for w, lab in [("good", "restaurant-positive"), ("bad", "restaurant-negative")] * 3))
    run_config = {"recipe": str(SMOKE), "overrides": " ".join(SMALL)}
    ctx = Context(run_id=7, node_id=1, node_config={"client-id": 2, "data-file": str(shard)}, state=RecordDict(),
                  run_config=run_config)
    rt = runtime(ctx)
    assert client_id(ctx) == 2 and isinstance(rt.task, NodeTask)
    assert rt.task.client_dataset(2)["label"] == [0, 1] * 3 and rt.cfg.sim.num_clients == cfg.sim.num_clients
    sim_ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 2}, state=RecordDict(), run_config=run_config)
    assert len(runtime(sim_ctx).task.client_dataset(2)) != 6  # without data-file: the simulation partition


def test_node_directory_takes_a_restarted_node_under_its_new_id():
    from fedpeft.nodes import NodeDirectory

    d = NodeDirectory({11: 0, 12: 1, 13: 2})
    assert d.unknown([13, 12, 11]) == []
    # Client 2's SuperNode died (node 13, still listed online) and came back as node 20; node 21 is new.
    assert d.unknown([11, 12, 13, 20, 21, 22]) == [20, 21, 22]
    assert d.update({20: 2, 21: 3}) == [13]
    assert d.node_to_client == {11: 0, 12: 1, 20: 2, 21: 3} and d.client_to_node[2] == 20
    assert d.client_of(13) == 2 and d.client_of(22) == -1  # a replaced id keeps its client for the ledger
    assert d.unknown([11, 12, 13, 20, 21, 22]) == [22]  # 22 did not answer: asked again; dead 13 never
    assert d.sample(0, 1, 4, [11, 12, 13, 20, 21]) == [11, 12, 20, 21]  # the dead id is never sampled
    assert d.sample(0, 1, 4, [11, 13, 20]) == [11, 20]  # fewer online than wanted: all online known nodes
