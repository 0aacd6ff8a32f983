"""What Flower's simulation dispatcher costs the driver, against `fedpeft.app.engine.dispatch`.

    python benchmarks/dispatch_cost.py NODES MESSAGES      # e.g. 1000 50, 10000 100

A real in-memory LinkState with NODES registered virtual nodes and MESSAGES train messages in flight
(delivered, waiting for replies, as in the middle of a round): the share of a core each dispatcher
thread uses over 2 s, and the cost of one pass of Flower's (one `get_message_ins` per node).
"""
import threading, time, sys
from queue import Queue
from fedpeft.env import set_offline_env; set_offline_env()
from flwr.app import Message, RecordDict, ConfigRecord, MessageType
from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes, add_messages_to_queue
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from fedpeft.app.engine.dispatch import dispatch_messages
N, M = int(sys.argv[1]), int(sys.argv[2])
sf = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)); run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES); run.federation_id = NOOP_FEDERATION_ID
TaskIdentity.task_id = 1; TaskIdentity.run_id = run.run_id; TaskIdentity.node_id = SUPERLINK_NODE_ID
st = sf.state(); st.run_ids[run.run_id] = RunRecord(run=run); st.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
mapping = _register_nodes(num_nodes=N, state_factory=sf)
grid = InMemoryGrid(state_factory=sf); grid.set_run(run)
nodes = list(mapping)[:M]
ids = grid.push_messages([Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes])
for name, fn in [("flower", add_messages_to_queue), ("fedpeft", dispatch_messages)]:
    for m in st.message_ins_store.values(): m.metadata.delivered_at = ""
    q, stop = Queue(), threading.Event()
    t = threading.Thread(target=fn, args=(st, q, mapping, stop)); c0 = time.thread_time(); w0 = time.perf_counter()
    t.start(); got = [q.get() for _ in range(M)]; stop.set(); t.join()
    # steady state: messages delivered, still stored (waiting for replies): cost of idle ticks over 2 s
    q, stop = Queue(), threading.Event()
    import resource
    r0 = resource.getrusage(resource.RUSAGE_SELF); w0 = time.perf_counter()
    t = threading.Thread(target=fn, args=(st, q, mapping, stop)); t.start(); time.sleep(2.0); stop.set(); t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF); w = time.perf_counter() - w0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{name:8} {N} nodes, {M} messages in flight: {100 * cpu / w:5.1f} % of a core while waiting for replies")
t0 = time.perf_counter(); c0 = time.process_time()
for n in mapping: st.get_message_ins(node_id=n, limit=1)
print(f"one Flower pass over {N} nodes: {time.perf_counter() - t0:.3f} s wall, {time.process_time() - c0:.3f} s CPU")
