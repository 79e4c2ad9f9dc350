"""The tuner cache on the CPU: round trip, nearest-bucket lookup, 16 concurrent writer
processes, and every way the file can go bad (each gives exactly one warning, attention keeps
working, the file is never left half-written)."""

from dataclasses import replace
import errno
import json
import multiprocessing
import os
import warnings

import pytest
import torch

from cases import Case, exact, make_inputs, rel_l2
from ffa import FastForwardAttn, LaunchConfig
from ffa.launch import heuristic
from ffa.tuner import cache
from ffa.tuner.__main__ import main

DEVICE = cache.DeviceInfo("Fake GPU 80GB", (9, 0), 132)
OTHER = cache.DeviceInfo("Other GPU", (8, 0), 108)
WRITERS, ROUNDS = 16, 5


def entry(bkv=8, length=1024, config=LaunchConfig(64, 2, 256), dtype="float32", head_dim=64, group=2,
          time_us=10.0):
    return cache.Entry(dtype, head_dim, group, bkv, length, config, time_us, LaunchConfig(128, 2, 0), 2 * time_us)


def tuner_warnings(caught):
    return [w for w in caught if issubclass(w.category, cache.TunerCacheWarning)]


def attention_works(table):
    """FastForwardAttn on CPU with `table` as its tuned table matches float64 attention, and
    picks the table's configuration when there is one."""
    c = Case(batch=2, heads=4, kv_heads=2, head_dim=64, prompt_len=37, max_len=64)
    K, V, q, k, v, t, start = make_inputs(c, torch.Generator().manual_seed(0))
    f = FastForwardAttn(K.float(), V.float(), c.max_len)
    f._tuned = table  # what __init__ sets from load_table for CUDA tensors
    out = f.attention(q.float(), k.float(), v.float(), 0.125, c.prompt_len)
    ref, _, _ = exact(K, V, q, k, v, t, start, 0.125, c.max_len)
    assert rel_l2(out, ref) < 1e-5
    # the length bucket (128) capped at the cache's max_len (64)
    expected = table.lookup(torch.float32, 64, 2, 4, 64) if table else None
    return f.launch_config(4, c.prompt_len + 1) == (expected or heuristic(2, 2, 2, 64, 1))


def test_round_trip_and_merge(cache_dir):
    first = [entry(8, 1024), entry(32, 4096, LaunchConfig(256, 1, 0))]
    assert cache.save(DEVICE, first)
    assert cache.save(DEVICE, [entry(8, 1024, LaunchConfig(128, 2, 512), time_us=3.0), entry(128, 128)])
    table = cache.load_table(DEVICE)
    assert {e.bucket: e for e in table.entries} == {e.bucket: e for e in
                                                   [entry(8, 1024, LaunchConfig(128, 2, 512), time_us=3.0),
                                                    first[1], entry(128, 128)]}
    assert table.lookup(torch.float32, 64, 2, 8, 1024) == LaunchConfig(128, 2, 512)
    assert cache.load_table(DEVICE) is table  # memoized
    doc = json.loads(cache.cache_file(DEVICE).read_text())
    assert doc["key"] == cache.device_key(DEVICE) and len(doc["entries"]) == 3
    assert attention_works(table)


def test_tensor_core_launches_round_trip(cache_dir):
    """A tuned tensor-core launch is stored as "tensor_cores": true and read back as such."""
    tc = LaunchConfig(128, 4, 256, tensor_cores=True)
    assert cache.save(DEVICE, [entry(32, 4096, tc, dtype="bfloat16", head_dim=128, group=4)])
    doc = json.loads(cache.cache_file(DEVICE).read_text())
    assert doc["entries"][0]["config"] == {"threads": 128, "heads_per_block": 4, "split_len": 256, "tensor_cores": True,
                                           "tma": False, "stages": 0, "tile_rows": 0, "pdl": False, "cluster": 1}
    assert doc["entries"][0]["heuristic"]["tensor_cores"] is False
    cache.reset()
    assert cache.load_table(DEVICE).lookup(torch.bfloat16, 128, 4, 32, 4096) == tc


def test_file_named_for_the_hardware():
    assert cache.cache_file(DEVICE).name == "fake-gpu-80gb-sm90-132sms.json"
    assert cache.cache_file(DEVICE) != cache.cache_file(OTHER)


def test_nearest_bucket_lookup():
    """Among the buckets of the same dtype, head_dim, group and batch*kv_heads, the nearest length
    (log2; ties to the longer) gives its kernel, threads and heads per block, within one octave; its
    own length gets its configuration exactly; farther lengths and other batch*kv_heads get None
    (the heuristic)."""
    a, b, c, d = LaunchConfig(64, 1, 64), LaunchConfig(128, 1, 128), LaunchConfig(256, 1, 256), LaunchConfig(64, 2, 512)
    table = cache.Table([entry(8, 1024, a), entry(32, 1024, b), entry(8, 16384, c), entry(8, 4096, d)])
    look = lambda bkv, length, **kw: table.lookup(kw.get("dtype", torch.float32), kw.get("head_dim", 64),
                                                  kw.get("group", 2), bkv, length)
    shape = lambda config: (config.threads, config.heads_per_block, config.tensor_cores)
    assert look(8, 1024) == a and look(32, 1024) == b and look(8, 16384) == c and look(8, 4096) == d
    assert shape(look(8, 8192)) == shape(c)        # between 4096 and 16384: the longer
    assert shape(look(8, 2048)) == shape(d)        # between 1024 and 4096: the longer
    assert shape(look(8, 32768)) == shape(c)       # one octave
    assert shape(look(8, 724)) == shape(a)         # half an octave
    assert shape(look(32, 2048)) == shape(b)
    assert look(8, 65536) is None and look(32, 4096) is None and look(8, 256) is None  # two octaves
    assert look(16, 1024) is None and look(24, 1024) is None and look(1024, 16384) is None  # no bucket of that batch*kv
    assert look(8, 1024, dtype=torch.float16) is None
    assert look(8, 1024, head_dim=128) is None
    assert look(8, 1024, group=1) is None
    assert look(8, 1024, dtype="float32") == a  # dtype names work too


def test_a_bucket_fits_other_lengths_with_as_many_splits():
    """At another length a tuned configuration keeps its split count, the number of blocks measured
    best for its batch*kv_heads: the split length scales with the length (multiples of 64; unsplit
    when one split would cover it all, and then without a cluster)."""
    split = LaunchConfig(128, 4, 1024, tensor_cores=True)  # 4 splits of a 4096-position bucket
    assert cache.fit_bucket(4096, split, 4096) == split
    assert cache.fit_bucket(4096, split, 8192) == LaunchConfig(128, 4, 2048, True)   # 4 longer ones
    assert cache.fit_bucket(4096, split, 3000) == LaunchConfig(128, 4, 768, True)    # 4 shorter
    assert cache.fit_bucket(4096, split, 100) == LaunchConfig(128, 4, 64, True)      # 2 of 64
    assert cache.fit_bucket(4096, split, 64) == LaunchConfig(128, 4, 0, True)        # one would cover it all
    unsplit = LaunchConfig(256, 1, 0)
    assert cache.fit_bucket(4096, unsplit, 8192) == cache.fit_bucket(4096, unsplit, 2048) == unsplit
    clustered = LaunchConfig(128, 16, 1024, tma=True, stages=2, tile_rows=128, pdl=True, cluster=2)  # 4 splits
    assert cache.fit_bucket(4096, clustered, 8192) == replace(clustered, split_len=2048)
    assert cache.fit_bucket(4096, clustered, 64) == replace(clustered, split_len=0, cluster=1)
    cache._config(cache.fit_bucket(4096, clustered, 64).as_dict(), 16)  # a launch the cache accepts


def test_lookup_traces_under_torch_compile():
    """The runtime calls Table.lookup inside attention(); torch.compile must trace it whole."""
    table = cache.Table([entry(4, 256, LaunchConfig(64, 2, 64))])
    K = torch.randn(2, 2, 100, 64)
    f = FastForwardAttn(K, K.clone(), 256)
    f._tuned = table
    compiled = torch.compile(lambda q, k, v: f.attention(q, k, v, 0.125, 100) * 2, fullgraph=True, backend="eager")
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 1, 64)
    out = compiled(q, k, k)
    assert out.shape == (2, 4, 64) and torch.isfinite(out).all()
    assert f._configs == {(4, 128, False): LaunchConfig(64, 2, 64)}


# ---- many processes at once --------------------------------------------------------------

def concurrent_entry(worker, round_):
    return entry(bkv=worker + 1, length=128 << round_, time_us=1.0 + worker + round_)


def _writer(directory, worker, barrier, queue):
    """One of the concurrent processes: save an entry, re-read the file, repeat; report any
    failed save, missing entry or warning."""
    os.environ[cache.ENV_DIR] = directory
    problems = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        barrier.wait(timeout=300)
        for r in range(ROUNDS):
            mine = concurrent_entry(worker, r)
            if not cache.save(DEVICE, [mine]):
                problems.append(f"save {r} failed")
            cache.reset()
            table = cache.load_table(DEVICE)
            if table is None or mine not in table.entries:
                problems.append(f"round {r}: own entry missing after save")
    problems += [str(w.message) for w in caught]
    queue.put((worker, problems))


def test_sixteen_processes_write_and_read_one_file(cache_dir):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(cache_dir), w, barrier, queue)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    reports = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert reports == {w: [] for w in range(WRITERS)}
    doc = json.loads(cache.cache_file(DEVICE).read_text())  # valid JSON, the right key
    assert doc["key"] == cache.device_key(DEVICE)
    _, entries = cache.read_file(cache.cache_file(DEVICE), cache.device_key(DEVICE))
    assert sorted(entries, key=lambda e: e.bucket) == sorted(
        (concurrent_entry(w, r) for w in range(WRITERS) for r in range(ROUNDS)), key=lambda e: e.bucket)
    assert not list(cache_dir.glob("*.tmp"))


# ---- files gone bad: one warning each, attention unharmed --------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 8)


def _edit(**key_changes):
    def edit(path):
        doc = json.loads(path.read_text())
        doc["key"].update(key_changes)
        path.write_text(json.dumps(doc))
    return edit


def _bad_entry(path):
    doc = json.loads(path.read_text())
    doc["entries"][0]["config"]["threads"] = 100
    path.write_text(json.dumps(doc))


def _config_field(name, value, dtype=None, **others):
    """Set (or, with value MISSING, delete) a field of the first entry's launch (and set `others`)."""
    def edit(path):
        doc = json.loads(path.read_text())
        config = doc["entries"][0]["config"]
        if value is MISSING:
            del config[name]
        else:
            config[name] = value
        config.update(others)
        if dtype:
            doc["entries"][0]["dtype"] = dtype
        path.write_text(json.dumps(doc))
    return edit


MISSING = object()


def _other_gpu(path):
    cache.save(OTHER, [entry()])
    os.replace(cache.cache_file(OTHER), path)


def _directory(path):
    path.unlink()
    path.mkdir()


BAD_FILES = {
    "truncated": (_truncate, "truncated"),
    "garbage bytes": (_garbage, "corrupt"),
    "other library version": (_edit(ffa_version="0.0.1"), "ffa_version '0.0.1'"),
    "other kernel ABI": (_edit(abi_version=99), "abi_version 99"),
    "other kernel version": (_edit(kernel_version=0), "kernel_version 0"),
    "other GPU": (_other_gpu, "gpu 'Other GPU'"),
    "invalid launch": (_bad_entry, "not a valid launch"),
    "tensor_cores not a bool": (_config_field("tensor_cores", 1), "tensor_cores=1 is not true or false"),
    "tensor_cores null": (_config_field("tensor_cores", None), "tensor_cores=None"),
    "tensor_cores missing": (_config_field("tensor_cores", MISSING), "malformed"),
    "tensor cores at float32": (_config_field("tensor_cores", True, "float32"), "does not have at float32"),
    "tma not a bool": (_config_field("tma", 0), "tma=0 is not true or false"),
    "tma ring out of range": (_config_field("tma", True, "float16", stages=1, tile_rows=64), "stages or tile_rows"),
    "cluster size not the kernel's": (_config_field("cluster", 3), "cluster size"),
    "cluster on a CUDA-core launch": (_config_field("cluster", 2), "cluster size"),
    "pdl on a CUDA-core launch": (_config_field("pdl", True), "pdl on a kernel that does not take it"),
    "unreadable": (_directory, "could not be read"),
}


@pytest.mark.parametrize("spoil", list(BAD_FILES))
def test_bad_file_is_ignored_with_one_warning(spoil):
    cache.save(DEVICE, [entry(4, 128)])
    damage, phrase = BAD_FILES[spoil]
    damage(cache.cache_file(DEVICE))
    cache.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = [cache.load_table(DEVICE) for _ in range(3)]
        assert attention_works(tables[0])
    assert tables == [None, None, None]
    [warning] = tuner_warnings(caught)
    assert phrase in str(warning.message) and str(cache.cache_file(DEVICE)) in str(warning.message)
    assert "python -m ffa.tuner" in str(warning.message)


def test_next_save_replaces_a_bad_file():
    cache.save(DEVICE, [entry(4, 128)])
    _garbage(cache.cache_file(DEVICE))
    assert cache.save(DEVICE, [entry(8, 256)])
    assert cache.load_table(DEVICE).entries == (entry(8, 256),)


def test_missing_file_is_silent():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load_table(DEVICE) is None
    assert not tuner_warnings(caught)


def test_device_description_failure_is_one_warning(monkeypatch):
    def broken(device):
        raise RuntimeError("no driver")
    monkeypatch.setattr(cache, "describe_device", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load_table(torch.device("cuda", 3)) is None
        assert cache.load_table(torch.device("cuda", 3)) is None
    [warning] = tuner_warnings(caught)
    assert "no driver" in str(warning.message)


# ---- writes that fail: one warning, nothing half-written ---------------------------------

def _read_only(directory, monkeypatch):
    """Make `directory` read-only; as root, permission bits do not stop writes, so opening a
    file for writing in it also fails the way a read-only directory makes it fail."""
    directory.chmod(0o555)
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(directory) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_)


def _full_disk(directory, monkeypatch):
    """The disk fills half-way through writing the new file."""
    def write_half(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache, "_write_all", write_half)


@pytest.mark.parametrize("failure", [_read_only, _full_disk], ids=["read-only dir", "disk full"])
def test_failed_write_warns_once_and_leaves_the_file_whole(cache_dir, monkeypatch, failure):
    assert cache.save(DEVICE, [entry(4, 128)])
    before = cache.cache_file(DEVICE).read_bytes()
    failure(cache_dir, monkeypatch)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cache.save(DEVICE, [entry(8, 256)]) is False
            assert cache.save(DEVICE, [entry(16, 512)]) is False
            table = cache.load_table(DEVICE)
            assert attention_works(table)
    finally:
        cache_dir.chmod(0o755)
    [warning] = tuner_warnings(caught)
    assert str(cache.cache_file(DEVICE)) in str(warning.message) and cache.ENV_DIR in str(warning.message)
    assert cache.cache_file(DEVICE).read_bytes() == before
    assert table.entries == (entry(4, 128),)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([cache.cache_file(DEVICE).name,
                                                                 cache.cache_file(DEVICE).name + ".lock"])


def test_interrupted_write_leaves_the_old_file(monkeypatch, cache_dir):
    assert cache.save(DEVICE, [entry(4, 128)])
    before = cache.cache_file(DEVICE).read_bytes()

    def interrupted(fd, data):
        os.write(fd, data[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(cache, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(DEVICE, [entry(8, 256)])
    assert cache.cache_file(DEVICE).read_bytes() == before
    assert not list(cache_dir.glob("*.tmp"))


def test_temporary_file_of_a_killed_writer_is_removed(cache_dir):
    assert cache.save(DEVICE, [entry(4, 128)])
    orphan = cache.cache_file(DEVICE).with_name(cache.cache_file(DEVICE).name + ".123.abcd.tmp")
    orphan.write_text('{"format": 1, "ke')  # a writer killed mid-write
    cache.reset()
    assert cache.load_table(DEVICE).entries == (entry(4, 128),)
    assert cache.save(DEVICE, [entry(8, 256)])
    assert not orphan.exists()


# ---- the command's --show and --clear ----------------------------------------------------

def test_show_prints_tuned_vs_heuristic(capsys):
    cache.save(DEVICE, [entry(8, 1024, time_us=10.0), entry(32, 4096, time_us=4.0)])
    assert main(["--show"], device_info=DEVICE) == 0
    text = capsys.readouterr().out
    assert str(cache.cache_file(DEVICE)) in text and "Fake GPU 80GB (sm 9.0, 132 SMs)" in text
    assert "64/2/256" in text and "2.00x" in text
    assert "geometric mean 2.000x" in text


def test_show_reports_an_unusable_file(capsys):
    cache.save(DEVICE, [entry()])
    _edit(ffa_version="0.0.1")(cache.cache_file(DEVICE))
    assert main(["--show"], device_info=DEVICE) == 1
    assert "ffa_version '0.0.1'" in capsys.readouterr().out


def test_clear_deletes_only_this_devices_file(capsys):
    cache.save(DEVICE, [entry()])
    cache.save(OTHER, [entry()])
    assert main(["--clear"], device_info=DEVICE) == 0
    assert "deleted" in capsys.readouterr().out
    assert not cache.cache_file(DEVICE).exists() and cache.cache_file(OTHER).exists()
    assert cache.load_table(DEVICE) is None
    assert main(["--clear"], device_info=DEVICE) == 0
    assert "no cache file" in capsys.readouterr().out
