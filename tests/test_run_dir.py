"""The run directory's parts in process: durable writes, the lock's judgements, verification and
repair of the final file, launcher detection and device choice, the fault hook."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from guided_diffusion import dist_util, durable, faults, run_dir


# ------------------------------------------------------------------ durable writes


def test_atomic_write_fsyncs_file_and_directory_then_renames(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "out.bin"
    with durable.atomic_write(str(target)) as f:
        f.write(b"abc")
        assert not target.exists()  # nothing under the name until the data is on disk
    assert target.read_bytes() == b"abc"
    assert synced[0].startswith(str(tmp_path / ".out.bin.tmp-")) and synced[-1] == str(tmp_path)
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("where", ["body", "before_replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, where):
    target = tmp_path / "out.txt"
    durable.write_text(str(target), "old")

    def fail(*_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        with durable.atomic_write(str(target), "w", before_replace=fail if where == "before_replace" else None) as f:
            f.write("new")
            if where == "body":
                fail()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_save_npz_keeps_the_name_and_stale_temps_are_found(tmp_path):
    durable.save_npz(str(tmp_path / "stats.cache"), mu=np.arange(3))
    with np.load(tmp_path / "stats.cache") as data:
        assert data["mu"].tolist() == [0, 1, 2]
    left = durable.temp_path(str(tmp_path / "x.npz"))  # what a killed writer leaves
    open(left, "wb").close()
    assert durable.stale_temps(str(tmp_path)) == [left]
    assert os.path.basename(left).startswith(".x.npz.tmp-")


# ------------------------------------------------------------------ final file: verification, repair


def finished_layout(tmp_path, n=5, batch=2, labels=True):
    layout = run_dir.Layout(str(tmp_path), num_samples=n, batch_size=batch, image_size=32, with_labels=labels)
    os.makedirs(layout.shard_dir)
    rng = np.random.default_rng(3)
    for b in range(layout.num_batches):
        run_dir.write_shard(layout, b, rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                            np.arange(batch) + b if labels else None)
    run_dir.merge(layout)
    return layout


def test_verification_catches_truncation_bit_flips_and_wrong_contents(tmp_path):
    layout = finished_layout(tmp_path)
    good = open(layout.final_path, "rb").read()
    assert run_dir.verify_final(layout) is None

    def damaged(data, keep_checksum=True):
        with open(layout.final_path, "wb") as f:
            f.write(data)
        if not keep_checksum and os.path.exists(layout.checksum_path):
            os.remove(layout.checksum_path)
        return run_dir.verify_final(layout)

    assert damaged(good[: len(good) // 2]).startswith("unreadable")
    assert damaged(b"").startswith("unreadable")
    flipped = bytearray(good)
    flipped[200] ^= 1  # inside arr_0's pixels
    assert "sha256 differs" in damaged(bytes(flipped))
    assert "CRC" in damaged(bytes(flipped), keep_checksum=False)  # no checksum: the zip CRCs
    assert damaged(good) is None and not os.path.exists(layout.checksum_path)
    no_labels = run_dir.Layout(str(tmp_path), 5, 2, 32, with_labels=False)
    assert "expected ['arr_0.npy']" in run_dir.verify_final(no_labels)
    np.savez(layout.final_path, arr_0=np.zeros((5, 32, 32, 1), np.uint8), arr_1=np.zeros(5, np.int64))
    assert "expected uint8 (5, 32, 32, 3)" in run_dir.verify_final(layout)


def test_a_broken_final_file_is_rebuilt_from_the_shards(tmp_path):
    layout = finished_layout(tmp_path)
    good = open(layout.final_path, "rb").read()
    with open(layout.final_path, "r+b") as f:
        f.truncate(100)
    warnings = []
    assert run_dir.open_run(layout, warn=warnings.append) == []  # nothing to sample again
    assert "fails verification" in warnings[0] and "rebuilding it from the shards" in warnings[0]
    assert not os.path.exists(layout.final_path)
    run_dir.finalize(layout)
    assert open(layout.final_path, "rb").read() == good and not os.path.exists(layout.shard_dir)


def test_a_broken_final_file_without_shards_means_sampling_again(tmp_path):
    layout = finished_layout(tmp_path)
    run_dir.finalize(layout)  # verified: the shards are gone
    with open(layout.final_path, "r+b") as f:
        f.truncate(0)
    assert not run_dir.is_complete(layout)
    warnings = []
    assert run_dir.open_run(layout, warn=warnings.append) == [0, 1, 2]
    assert "sampling its 3 missing batch(es) again" in warnings[0]


def test_leftover_shard_files_keep_a_run_incomplete_until_removed(tmp_path):
    layout = finished_layout(tmp_path)
    open(os.path.join(layout.shard_dir, "batch_000001.tmp4242.npz"), "wb").close()  # an older version's temp
    assert run_dir.verify_final(layout) is None and not run_dir.is_complete(layout)
    run_dir.finalize(layout)
    assert run_dir.is_complete(layout) and not os.path.exists(layout.shard_dir)


def test_finalize_refuses_to_merge_with_missing_shards(tmp_path):
    layout = finished_layout(tmp_path)
    os.remove(layout.final_path)
    os.remove(layout.shard_path(1))
    with pytest.raises(run_dir.RunDirError, match=r"shards missing after sampling: \[1\]"):
        run_dir.finalize(layout)
    assert layout.finished_batches() == [0, 2]


# ------------------------------------------------------------------ the lock


def lock_record(**fields):
    record = dict(host=socket.gethostname(), pid=os.getpid(), started="2030-01-01 00:00:00 UTC")
    record.update(fields)
    return record


def put_lock(directory, record):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, run_dir.LOCK_FILE), "w") as f:
        f.write(record if isinstance(record, str) else json.dumps(record))


def test_lock_records_this_process_and_is_released(tmp_path):
    lock = run_dir.acquire_lock(str(tmp_path / "run"))
    held = run_dir.read_lock(str(tmp_path / "run"))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and "UTC" in held["started"]
    with pytest.raises(run_dir.RunDirError, match="already locked by this process"):
        run_dir.acquire_lock(str(tmp_path / "run"))
    lock.release()
    assert run_dir.read_lock(str(tmp_path / "run")) is None
    # release() never removes a lock that is not ours
    put_lock(str(tmp_path / "run"), lock_record(pid=1))
    lock.release()
    assert run_dir.read_lock(str(tmp_path / "run"))["pid"] == 1


def test_a_live_run_on_this_host_is_never_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        put_lock(str(tmp_path), lock_record(pid=child.pid, process_start=run_dir._process_start(child.pid)))
        for force in (False, True):
            with pytest.raises(run_dir.RunDirError) as info:
                run_dir.acquire_lock(str(tmp_path), force=force)
            assert f"in use by another run (pid {child.pid} on host {socket.gethostname()}, started 2030" in str(info.value)
            with pytest.raises(run_dir.RunDirError):
                run_dir.check_lock(str(tmp_path), force=force)
    finally:
        child.kill()
        child.wait()
    warnings = []
    lock = run_dir.acquire_lock(str(tmp_path), warn=warnings.append)  # its process is gone now
    assert warnings == [f"warning: taking over the lock of an earlier run (its process is gone): pid {child.pid} "
                        f"on host {socket.gethostname()}, started 2030-01-01 00:00:00 UTC; lock {tmp_path}/run.lock"]
    assert run_dir.read_lock(str(tmp_path)) == lock.record


def test_a_reused_pid_or_a_reboot_makes_a_lock_stale(tmp_path):
    parent = os.getppid()  # alive, but not the process that took the lock
    for record, why in [(lock_record(pid=parent, process_start=-5), "the pid now belongs to another process"),
                        (lock_record(pid=parent, boot_id="another-boot"), "this host was rebooted since")]:
        put_lock(str(tmp_path), record)
        warnings = []
        run_dir.acquire_lock(str(tmp_path), warn=warnings.append).release()
        assert why in warnings[0]


def test_a_lock_from_another_host_needs_force_unlock(tmp_path):
    put_lock(str(tmp_path), lock_record(host="gpu-node-17", pid=4242))
    with pytest.raises(run_dir.RunDirError) as info:
        run_dir.acquire_lock(str(tmp_path))
    line = str(info.value)
    assert "locked by a run on another host (pid 4242 on host gpu-node-17" in line and "--force_unlock" in line
    warnings = []
    run_dir.acquire_lock(str(tmp_path), force=True, warn=warnings.append)
    assert warnings[0].startswith("warning: --force_unlock: breaking the lock of the run on host gpu-node-17")


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    put_lock(str(tmp_path), lock_record(host="gpu-node-17", pid=4242, slurm_job_id="777", slurm_restart_count=0))
    warnings = []
    run_dir.acquire_lock(str(tmp_path), warn=warnings.append)
    assert "SLURM job 777 was requeued since" in warnings[0]


def test_an_unreadable_lock_is_refused_unless_forced(tmp_path):
    put_lock(str(tmp_path), "{half a reco")
    with pytest.raises(run_dir.RunDirError, match="unreadable lock .*--force_unlock"):
        run_dir.acquire_lock(str(tmp_path))
    run_dir.acquire_lock(str(tmp_path), force=True, warn=lambda line: None)
    assert run_dir.read_lock(str(tmp_path))["pid"] == os.getpid()


# ------------------------------------------------------------------ launchers, devices, fault hook

LAUNCH_VARS = (dist_util._LAUNCHER_VARS + dist_util._TORCHRUN_VARS
               + ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK"))


@pytest.mark.parametrize("env, kind, rank", [
    ({}, None, 0),
    ({"PMI_RANK": "3", "PMI_SIZE": "4"}, "mpi", 3),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "mpi", 1),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, "torchrun", 5),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}, "srun", 2),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None, 0),  # a batch script, not an srun task
    # torchrun started by srun (one agent per node): torchrun's variables count
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"},
     "torchrun", 6),
])
def test_launcher_detection(monkeypatch, env, kind, rank):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert dist_util.launcher() == kind and dist_util.env_rank() == rank


def test_cuda_index_and_slurm_hostlists():
    assert dist_util.cuda_index(local_rank=3, world_size=4, device_count=8) == 3
    assert dist_util.cuda_index(local_rank=9, world_size=16, device_count=8) == 1
    assert dist_util.cuda_index(local_rank=1, world_size=2, device_count=8, gpu_offset=4) == 5
    assert dist_util.cuda_index(local_rank=0, world_size=1, device_count=8, gpu=6) == 6
    with pytest.raises(ValueError, match="CUDA device 9 does not exist"):
        dist_util.cuda_index(local_rank=5, world_size=8, device_count=8, gpu_offset=4)
    assert dist_util.first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert dist_util.first_host("node7,node8") == "node7"
    assert dist_util.first_host("rack[2-3]-ib") == "rack2-ib"


def test_fault_hook_counts_hits_and_filters_ranks(monkeypatch):
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("SAG_ADM_FAULT", "merging@2")
    monkeypatch.setenv("SAG_ADM_FAULT_MODE", "raise")
    faults.point("step")
    faults.point("merging")
    with pytest.raises(RuntimeError, match="injected failure at 'merging'"):
        faults.point("merging")
    monkeypatch.setenv("SAG_ADM_FAULT_RANK", "1")  # this process is rank 0
    monkeypatch.setattr(faults, "_hits", {})
    faults.point("merging")
    faults.point("merging")
