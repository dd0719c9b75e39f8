"""torchrun with gloo on CPU: stage processes give the single-process result bit for bit.

Every run here uses OMP_NUM_THREADS=1 (torchrun's own default), single-process runs included:
CPU kernels may sum in another order with another thread count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import example_frames, failure, ROOT
from transfer.distributed.placement import Placement
from transfer.planning.chooser import preset
from transfer.errors import TransferError
from transfer.video_io import read_video, write_mp4

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "5"]
ENV = {"OMP_NUM_THREADS": "1", "TRANSFER_LOG_LEVEL": "INFO"}


def launch(nproc: int, *args: str, popen: bool = False, env: dict | None = None):
    env = {**os.environ, **ENV, **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "transfer.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "transfer.py"),
               "--num_gpus", str(nproc), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """Three requests: a single-chunk video, a three-chunk video, a two-control video (three chunks)."""
    d = tmp_path_factory.mktemp("dist")
    for name in ("example_input.mp4", "example_edge.mp4", "example_vis.mp4"):
        write_mp4(d / name, example_frames(name, 13), 24)
        write_mp4(d / f"short_{name}", example_frames(name, 5), 24)
    edge = {"control_weight": 1.0, "input_control": "example_edge.mp4"}
    lines = [
        {"name": "single", "prompt": "one chunk", "input_video_path": "short_example_input.mp4",
         "edge": {"control_weight": 1.0, "input_control": "short_example_edge.mp4"}, "seed": 11},
        {"name": "three", "prompt": "three chunks", "input_video_path": "example_input.mp4", "edge": edge, "seed": 12},
        {"name": "multi", "prompt": "two controls", "input_video_path": "example_input.mp4",
         "edge": {"control_weight": 0.7, "input_control": "example_edge.mp4"},
         "vis": {"control_weight": 0.5, "input_control": "example_vis.mp4"}, "seed": 13},
    ]
    (d / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def reference_run(batch_file: Path, out: Path, *args: str) -> Path:
    """An uninterrupted single-process run of ``batch_file`` into ``out`` (OMP_NUM_THREADS=1, as torchrun)."""
    proc = launch(1, "--batch_input_path", str(batch_file), "--video_save_folder", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process(tiny_ckpt, batch, tmp_path_factory) -> Path:
    return reference_run(batch / "batch.jsonl", tmp_path_factory.mktemp("single"), "--save_raw", *FAST)


@pytest.mark.parametrize("nproc", [4, 2, 3, 6])
def test_stage_processes_equal_single_process(tiny_ckpt, batch, single_process, tmp_path, nproc):
    trace = tmp_path / "trace.json"
    proc = launch(nproc, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--save_raw", "--trace", str(trace), *FAST)
    assert proc.returncode == 0, failure(proc)
    for name, chunks in (("single", 1), ("three", 3), ("multi", 3)):
        ref, got = np.load(single_process / f"{name}.npz"), np.load(tmp_path / f"{name}.npz")
        assert ref["latents"].shape[0] == chunks
        assert np.array_equal(ref["frames"], got["frames"]), name
        assert np.array_equal(ref["latents"], got["latents"]), name
        assert (tmp_path / f"{name}.mp4").is_file()
    assert "busy s" in proc.stderr and "idle" in proc.stderr  # the per-stage table
    data = json.loads(trace.read_text())
    stages = {e["cat"] for e in data["traceEvents"] if e["ph"] == "X"}
    assert {"coordinator", "text", "vae", "dit"} <= stages
    # the CPU presets split no sequence: CFG pairs (2, 3, 6 ranks) or replicas (4 ranks: three requests, three DiT
    # ranks); either way more than one rank denoised
    assert len({e["pid"] for e in data["traceEvents"] if e["ph"] == "X" and e["cat"] == "dit"}) > 1
    assert "placement: " in proc.stderr and "sp 2" not in proc.stderr  # the chosen layout is printed


def test_direction_groups_transport_equals_single_process(tiny_ckpt, batch, single_process, tmp_path):
    """Every tensor over the per-direction groups (the path CUDA tensors take with NCCL), here on gloo,
    6 ranks so the CFG pair's per-step traffic takes it too. The DiT group is [1, 2, 3, 4] (cfg 2 x sp 2): rank 4
    gets its chunks from the leader (1) and its velocities from rank 2, so either can come first; the leader sends
    rank 4's chunks a second late (tests/faults) so the velocity always does, as it sometimes did under load (the run
    crashed: no handler for it)."""
    env = {"TRANSFER_TRANSPORT": "pairs", "TRANSFER_TEST_FAULT": "1:late_shard",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    proc = launch(6, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--save_raw", "--context_parallel_size", "2", *FAST, env=env)
    assert proc.returncode == 0, failure(proc)
    assert "DiT groups [1, 2, 3, 4] (cfg 2 x sp 2)" in proc.stderr
    assert "rank 4: early velocity" in proc.stderr, failure(proc)
    for name in ("single", "three", "multi"):
        ref, got = np.load(single_process / f"{name}.npz"), np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"]), name


def test_single_spec_run_equals_single_process(tiny_ckpt, batch, tmp_path):
    """A plain --controlnet_specs run (no batch): two controls, three chunks, 4 ranks vs 1, in bf16 (``--dtype``; the
    batch tests above run fp32): bit for bit, no NaN."""
    line = json.loads((batch / "batch.jsonl").read_text().splitlines()[2])
    spec = batch / "multi_spec.json"
    spec.write_text(json.dumps({k: v for k, v in line.items() if k not in ("name", "seed")}))
    outs = {}
    for nproc in (1, 4):
        outs[nproc] = tmp_path / str(nproc)
        proc = launch(nproc, "--controlnet_specs", str(spec), "--video_save_folder", str(outs[nproc]), "--save_raw",
                      "--seed", "13", "--dtype", "bf16", *FAST)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert nproc > 1 or "(torch.bfloat16)" in proc.stderr
    ref, got = np.load(outs[1] / "output.npz"), np.load(outs[4] / "output.npz")
    assert ref["latents"].shape[0] == 3 and not np.isnan(ref["latents"]).any() and ref["frames"].std() > 1
    assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"])
    assert json.loads((outs[4] / "manifest.json").read_text())["requests"]["output"]["settings"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in outs[4].iterdir()) == ["manifest.json", "output.mp4", "output.npz", "output.txt"]


def test_batch_is_handed_out_in_a_bounded_window(tiny_ckpt, batch, tmp_path):
    """Six requests, one DiT: requests beyond the window (1 group + LOOKAHEAD) reach the text and VAE stages
    only after an earlier request was released (checked and written), so stage memory does not grow with the batch."""
    from transfer.distributed.coordinator import LOOKAHEAD

    line = json.loads((batch / "batch.jsonl").read_text().splitlines()[0])  # the one-chunk request
    six = batch / "six.jsonl"
    six.write_text("".join(json.dumps({**line, "name": f"r{j}", "seed": j}) + "\n" for j in range(6)))
    trace = tmp_path / "trace.json"
    placement = tmp_path / "placement.json"  # one DiT (the CPU preset for 6 requests would make three replicas)
    placement.write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]}))
    proc = launch(4, "--batch_input_path", str(six), "--video_save_folder", str(tmp_path), "--trace", str(trace),
                  "--placement", str(placement), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == [f"r{j}.mp4" for j in range(6)]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    start = {(e["name"], e["args"].get("request")): e["ts"] for e in events}
    writes = sorted(e["ts"] + e["dur"] for e in events if e["name"] == "release")
    window = 1 + LOOKAHEAD
    for j in range(window, 6):
        # request j goes out once request j - window is written (requests finish in order with one DiT)
        assert start[("encode", j)] >= writes[j - window], j
        assert start[("encode_controls", j)] >= writes[j - window], j
    assert start[("encode", 0)] < writes[0]


def test_each_rank_holds_only_its_stages_weights(tiny_ckpt, batch, tmp_path):
    """6 ranks, the small-GPU layout of --placement: coordinator, text, vae and a CFG pair + a replica."""
    trace = tmp_path / "trace.json"
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3, 4], [5]]}))
    proc = launch(6, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--trace", str(trace), "--placement", str(placement), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads(trace.read_text())["otherData"]["parameters_by_rank"]
    assert held["0"] == {}
    assert set(held["1"]) == {"text_encoder"} and held["1"]["text_encoder"] > 0
    assert set(held["2"]) == {"vae"} and held["2"]["vae"] > 0
    for r in ("3", "4", "5"):
        assert set(held[r]) == {"transformer", "controlnets"} and held[r]["transformer"] > 0


def _rank_pids(root_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc)."""
    import psutil

    out = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            env = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = child.pid
    return out


def test_killed_stage_ends_every_rank_without_output(tiny_ckpt, batch, tmp_path):
    proc = launch(4, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--num_steps", "30", "--num_frames_per_chunk", "5", popen=True)
    lines = []
    while True:  # kill the VAE rank once the first chunk has come back through it
        line = proc.stdout.readline()
        assert line, "".join(lines)[-3000:]
        lines.append(line)
        if "chunk 1/" in line:
            break
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1, 2, 3}
    os.kill(pids[2], signal.SIGKILL)
    start = time.monotonic()
    proc.communicate(timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written file
    # The one-chunk request may have finished before the kill; anything present is complete.
    assert {p.name for p in tmp_path.glob("*.mp4")} <= {"single.mp4"}
    for path in tmp_path.glob("*.mp4"):
        assert read_video(path)[0].shape == (5, 96, 160, 3)
    import psutil

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids.values())


def test_refused_run_under_torchrun_names_its_error_in_torchruns_summary(tiny_ckpt, batch, tmp_path):
    """A request refused before any work, under torchrun: rank 0's one line, nothing written, and torchrun's
    ChildFailedError summary (printed last, by the agent) carries the same line for each rank (its error file)."""
    proc = launch(2, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path / "out"),
                  "--num_frames_per_chunk", "10")
    message = "transfer.py: error: --num_frames_per_chunk must be 1 + 4k"
    ours = [line for line in proc.stderr.splitlines() if line.startswith(message)]
    summary = [line for line in proc.stderr.splitlines() if line.strip().startswith(f"traceback : {message}")]
    assert proc.returncode != 0 and len(ours) == 1 and len(summary) == 2, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_bad_request_found_by_the_coordinator_is_recorded_and_the_rest_runs(tiny_ckpt, batch, tmp_path):
    (batch / "broken.mp4").write_bytes(b"\x00" * 1000)
    bad = batch / "bad_batch.jsonl"
    line = json.loads((batch / "batch.jsonl").read_text().splitlines()[1])
    bad.write_text(json.dumps(line) + "\n" + json.dumps({**line, "name": "broken", "input_video_path": "broken.mp4"}) + "\n")
    start = time.monotonic()
    proc = launch(4, "--batch_input_path", str(bad), "--video_save_folder", str(tmp_path), *FAST)
    assert proc.returncode != 0  # some request failed
    assert time.monotonic() - start < 180
    assert "cannot read input video" in proc.stderr and "broken.mp4" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failures.jsonl", "manifest.json", "three.mp4", "three.txt"]
    (record,) = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert record["line"] == 2 and record["name"] == "broken"


def test_placement_presets_and_validation():
    from transfer.distributed.placement import DiTGroup, heads_split
    from transfer.planning.chooser import choose_preset

    # one video (Transfer2.5-2B: 16 heads, guidance 3): one DiT group over every rank, stages beside shards; on GPUs
    # the group's ranks also form the VAE group (led by the DiT leader), on CPU the VAE keeps one rank unless asked
    assert preset(8).dit_groups == (DiTGroup(tuple(range(8)), 2, 4),)
    assert preset(8).stages_of(0) == ["coordinator", "text", "vae", "dit"] and preset(8).stages_of(1) == ["vae", "dit"]
    assert preset(8).vae.ranks == tuple(range(8)) and preset(8, latent_rows=5).vae.ranks == tuple(range(5))
    assert preset(8, vae_degree=1).vae.ranks == (1,) and preset(8, split_sequence=False).vae.ranks == (7,)
    cpu = preset(4, split_sequence=False, vae_degree=2)  # the DiT group [1, 2] splits the VAE; rank 3 is freed
    assert (cpu.vae.ranks, cpu.dit_groups[0].ranks, cpu.idle) == ((1, 2), (1, 2), (3,))
    assert "VAE group [1, 2]" in cpu.describe()
    with pytest.raises(TransferError, match="--vae_parallel_degree 6: the smallest request has 5 latent rows"):
        preset(8, vae_degree=6, latent_rows=5)
    with pytest.raises(TransferError, match=r"--vae_parallel_degree 9 must be between 1 and the 8 process\(es\)"):
        preset(8, vae_degree=9)
    with pytest.raises(TransferError, match="no placement of 4 processes .* and a VAE group of 3"):
        preset(4, split_sequence=False, vae_degree=3)  # the CPU preset's DiT group has 2 ranks
    assert preset(2).dit_groups == (DiTGroup((0, 1), 2, 1),)
    assert preset(3).dit_groups == (DiTGroup((0, 1, 2), 1, 3),)  # 16 heads over 3: padded to 18 (Ulysses anything)
    assert preset(4, guidance=1.0).dit_groups == (DiTGroup((0, 1, 2, 3), 1, 4),)  # no CFG: no guidance branches
    assert preset(8, sp=8).dit_groups == (DiTGroup(tuple(range(8)), 1, 8),)  # upstream's default: CP over all 8
    # small GPUs: text encoder and VAE apart and off the DiT ranks
    small = preset(8, share_stages=False)
    assert (small.text.leader, small.vae.leader, small.dit_groups) == (0, 7, (DiTGroup((1, 2, 3, 4, 5, 6), 2, 3),))
    # a batch: groups chosen by the cost model, printed
    many = choose_preset(7, requests=3, heads=2)
    assert many.placement.dit_groups == tuple(DiTGroup((a, a + 1), 2, 1) for a in (1, 3, 5)) and many.placement.text.leader == 0
    assert many.why.startswith("a batch of 3 requests on 7 ranks: 3 DiT groups of cfg 2 x sp 1")
    # two nodes of 3: sequence-parallel branches inside a node, the CFG branches across
    two = preset(6, heads=2, per_node=3)
    assert two.dit_groups == (DiTGroup((1, 2, 3, 4), 2, 2),) and (two.text.ranks, two.vae.ranks) == ((0,), (5,))
    assert heads_split(16, 4) and heads_split(16, 3) and not heads_split(16, 5) and not heads_split(2, 3)
    # any world size; beyond what 16 heads split one video over, ranks stay idle rather than slow it down
    assert preset(12).dit_groups == (DiTGroup(tuple(range(12)), 2, 6),)
    wide = preset(24)
    assert wide.dit_groups == (DiTGroup(tuple(range(1, 17)), 2, 8),) and wide.idle == (19, 20, 21, 22, 23)
    assert "rank 23: idle" in wide.describe()
    with pytest.raises(TransferError, match="does not split the DiT's 16 attention heads"):
        preset(8, sp=5)
    with pytest.raises(TransferError, match="more than the 4 ranks of a node"):
        preset(8, sp=8, per_node=4)
    # placement files: lists as before, and {"ranks", "cfg", "sp"}
    assert DiTGroup.parse({"ranks": [4, 5, 6, 7], "cfg": 2, "sp": 2}).branches() == [(4, 5), (6, 7)]
    assert DiTGroup.parse([3, 4]) == DiTGroup((3, 4), 2, 1) and DiTGroup((4, 5, 6, 7), 2, 2).counterpart(5) == 7
    with pytest.raises(TransferError, match="cfg \\(1 or 2\\) x sp ranks"):
        DiTGroup.parse({"ranks": [1, 2, 3], "cfg": 2, "sp": 2})
    with pytest.raises(TransferError, match="outside 0..3"):
        Placement(4, text=4, vae=2, dit_groups=((3,),))
    with pytest.raises(TransferError, match="leaves rank 3 without a stage"):
        Placement(4, text=1, vae=2, dit_groups=((0,),))
    with pytest.raises(TransferError, match="DiT replicas must not share"):
        Placement(4, text=1, vae=2, dit_groups=((0,), (3,)))
    # stages are rank groups: a VAE group of several ranks (placement files too); the text encoder runs on one rank
    wide_vae = Placement(5, text=1, vae=(2, 3), dit_groups=((4,),))
    assert wide_vae.vae.leader == 2 and wide_vae.stages_of(3) == ["vae"] and (0, 3) in wide_vae.talking_pairs()
    assert (3, 4) not in wide_vae.talking_pairs() and (2, 3) in wide_vae.talking_pairs()  # the leader leads
    wide_vae.check_runnable()
    with pytest.raises(TransferError, match=r"the text stage on ranks \[1, 2\]: it runs on one rank"):
        Placement(4, text=(1, 2), vae=2, dit_groups=((3,),)).check_runnable()
    with pytest.raises(TransferError, match=r"the VAE group \[2, 0, 1\] shares ranks with the DiT group \[0, 1\]: it "
                                            r"must be led by that group's leader \(rank 0\)"):
        Placement(3, vae=(2, 0, 1), dit_groups=((0, 1),))
    Placement(3, vae=(2, 0), dit_groups=((0, 1),))  # one shared rank cannot order two collectives two ways
    with pytest.raises(TransferError, match="distinct ranks"):
        Placement(4, text=1, vae=(2, 2), dit_groups=((3,),))


def test_process_groups_only_between_ranks_that_talk():
    """One group per direction between ranks that exchange tensors, not per ordered pair of the world."""
    from transfer.distributed.placement import Placement

    p = Placement(16, coordinator=0, text=1, vae=2, dit_groups=((3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15,)))
    pairs = p.talking_pairs()
    assert len(pairs) == 70 < 16 * 15  # 15 + 7 + 7 + 6 links, both directions
    assert (3, 4) in pairs and (4, 3) in pairs and (3, 5) not in pairs  # a CFG pair talks; two replicas do not
    assert all((b, a) in pairs for a, b in pairs) and pairs == sorted(set(pairs))
    assert {(1, r) for r in (3, 5, 7, 9, 11, 13, 15)} <= set(pairs) and (1, 4) not in pairs  # text feeds each leader
    # 2 nodes x 8 GPUs, one video: one cfg 2 x sp 8 group; the shards' collectives use their mesh groups
    two_nodes = preset(16, per_node=8)
    assert two_nodes.dit_groups[0].branches() == [tuple(range(8)), tuple(range(8, 16))]
    assert len(two_nodes.talking_pairs()) == 44  # leader 0 with every shard, 8 counterpart pairs, vae 1 <-> leader
    assert preset(1).talking_pairs() == []


def test_early_velocity_waits_for_its_step_and_unknown_messages_are_named():
    """The event loop's dispatch, on a rank with no models (one process: the transport delivers to itself): a
    counterpart's velocity that comes before this rank's chunk is kept and handed to that step's swap, not to
    the loop; a message kind this rank's roles do not receive fails naming the kind, its sender and its ids."""
    from collections import deque

    import torch

    from transfer.distributed.dit_group import BranchExchange, DiTRole
    from transfer.distributed.rank_loop import RankLoop
    from transfer.distributed.transport import LocalTransport, Message

    loop = RankLoop.__new__(RankLoop)  # the loop's own state and one role (__init__ loads the stages' models)
    loop.rank, loop.stages, loop.dropped = 0, ["dit"], set()
    loop.transport, loop.deferred = LocalTransport(0), deque()
    role = DiTRole(loop, dit=None)
    loop.roles = {"dit": role}
    early = torch.arange(4.0)
    loop.dispatch(Message("velocity", 0, {"j": 3, "k": 1, "i": 0}, {"velocity": early}))
    assert list(role.inputs) == [("velocity", 3, 1, 0)] and loop.transport.get(0) is None
    swap = BranchExchange(role, counterpart=0, positive=False, j=3, k=1)
    assert torch.equal(swap.swap(0, torch.zeros(4)), early) and not role.inputs  # the kept one, not its own echo
    assert loop.transport.get(0).kind == "velocity"  # what this rank sent its counterpart (itself here) is still queued
    with pytest.raises(RuntimeError, match=r"rank 0 \(dit\) does not handle a 'nonsense' message \(from rank 2, "
                                           r"\{'j': 3\}\)"):
        loop.dispatch(Message("nonsense", 2, {"j": 3}))
    with pytest.raises(RuntimeError, match=r"rank 0 \(dit\) does not handle a 'decoded' message"):  # the coordinator's
        loop.dispatch(Message("decoded", 2, {"j": 3, "k": 0}))


def test_a_dropped_request_still_follows_its_vae_groups_calls():
    """A VAE group's leader may be inside a split call's collectives when another rank gets ``drop`` for that request:
    the follower must still make the call (``vae_work`` is ``always``), or the leader waits forever; other messages
    of a dropped request are ignored, and forgetting it keeps a queued ``vae_work``."""
    from collections import deque

    from transfer.distributed.rank_loop import RankLoop
    from transfer.distributed.transport import LocalTransport, Message

    class Recorder:
        name = "vae"
        calls: list = []

        def on_vae_work(self, msg):
            self.calls.append(("vae_work", msg.meta["j"]))

        def on_decode(self, msg):
            self.calls.append(("decode", msg.meta["j"]))

        def forget(self, j):
            pass

        def after_message(self):
            pass

    loop = RankLoop.__new__(RankLoop)
    loop.rank, loop.stages, loop.dropped, loop.transport = 1, ["vae"], set(), LocalTransport(1)
    role = Recorder()
    loop.roles = {"vae": role}
    work = Message("vae_work", 0, {"j": 3, "k": 0, "op": "decode", "reencode": False})
    loop.deferred = deque([work, Message("decode", 0, {"j": 3, "k": 0, "reencode": False})])
    loop.job = type("Job", (), {"batch": True})()
    loop.placement = Placement(2, vae=(0, 1), dit_groups=((0,),))
    loop.forget(3)
    assert list(loop.deferred) == [work]  # the queued call survives the drop
    loop.dispatch(loop.deferred.popleft())
    loop.dispatch(Message("decode", 0, {"j": 3, "k": 1, "reencode": False}))
    assert role.calls == [("vae_work", 3)]


def test_protocol_table_matches_the_roles_and_guards_the_sender():
    """Every dispatched message kind has its ``on_<kind>`` handler on the class of its receiving role (``any``: the
    rank loop's own) and every handler is a kind its class receives; the batch failure rule reads the table; a send
    with an unknown kind or other meta fields fails at the sender."""
    from transfer.distributed.coordinator import CoordinatorRole
    from transfer.distributed.dit_group import DiTRole
    from transfer.distributed.encoders import PreprocessRole, TextRole, VAERole
    from transfer.distributed.protocol import KINDS, PROTOCOL, ProtocolError
    from transfer.distributed.rank_loop import RankLoop
    from transfer.distributed.transport import LocalTransport

    classes = {"any": RankLoop, "coordinator": CoordinatorRole, "preprocess": PreprocessRole, "text": TextRole,
               "vae": VAERole, "dit": DiTRole}
    handlers = {(receiver, name.removeprefix("on_")) for receiver, cls in classes.items()
                for name in vars(cls) if name.startswith("on_")}
    assert handlers == {(k.receiver, k.name) for k in KINDS if k.dispatched}
    assert {k.name for k in KINDS if k.request_work} == {"precompute", "text", "controls", "decode", "chunk_plan", "embeds",
                                                          "control_latents", "cond", "shard_chunk", "vae_work"}
    assert {k.name for k in KINDS if k.always} == {"vae_work"}  # handled for a dropped request: collectives wait
    assert all("j" in k.meta for k in KINDS if k.request_work)  # one request's work names the request
    transport = LocalTransport(0)
    with pytest.raises(ProtocolError, match="unknown message kind 'nonsense'"):
        transport.send(0, "nonsense", {"j": 1})
    with pytest.raises(ProtocolError, match=r"a 'decode' message needs meta \['j', 'k', 'reencode'\]: missing \['reencode'\], "
                                            r"unexpected \['x'\]"):
        transport.send(0, "decode", {"j": 1, "k": 0, "x": 2})
    transport.send(0, "decode", {"j": 1, "k": 0, "reencode": True})
    assert transport.get(0).kind == "decode" and set(PROTOCOL) == {k.name for k in KINDS}


def test_stage_table_counts_nested_spans_once():
    """Per-step spans lie inside their chunk's span: busy time counts the chunk, not both."""
    from transfer.distributed.trace import Tracer, busy_by_stage, stage_table

    tracer = Tracer(rank=3, t0=100.0)
    tracer.add("dit", "denoise", 100.0, 104.0, request=0, chunk=0)
    for i in range(4):
        tracer.add("dit", f"step {i}", 100.0 + i, 101.0 + i, nested=True, request=0, chunk=0, step=i)
    tracer.add("vae", "decode", 104.0, 105.5, request=0, chunk=0)
    assert busy_by_stage(tracer.spans) == {(3, "dit"): 4.0, (3, "vae"): 1.5}
    table = stage_table(tracer.spans, wall=8.0, bytes_sent={3: 2_000_000}, send_seconds={3: 0.25})
    assert "   3  dit              4.00     50%      2.00    0.250" in table
