"""benchmark.py end to end on the CPU, the MFU arithmetic, sweeps, errors and the compilation cache."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from resnet_jax import benchmark, compile_cache, costs, parallel
from tests.conftest import run_script, xla_flags_with

REQUIRED_FIELDS = {
    "model",
    "batch_size",
    "image_size",
    "dtype",
    "images_per_sec",
    "step_time_median_ms",
    "compile_seconds",
    "mfu",
    "images_per_sec_per_device",
    "step_time_p90_ms",
    "flops_per_step_per_device",
    "peak_memory_bytes",
    "device_kind",
    "device_count",
    "jax_version",
    "jaxlib_version",
    "compile_cache_hit",
    "flags",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One compilation cache for the module, so that later runs load what earlier ones compiled."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture
def restore_cache_settings():
    """enable_compilation_cache changes process-wide JAX settings; put them back afterwards."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


@pytest.mark.slow
def test_cli_sweep_writes_one_row_per_configuration_with_every_field(tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    result = run_script(
        "benchmark.py",
        "--model=resnet20",
        "--batch_size=4,8",
        "--image_size=8",
        "--steps=3",
        "--warmup_steps=1",
        f"--json={out}",
        f"--compilation_cache_dir={cache_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["model"], r["batch_size"]) for r in rows] == [("resnet20", 4), ("resnet20", 8)]
    for row in rows:
        assert not REQUIRED_FIELDS - row.keys()
        assert row["images_per_sec"] > 0 and row["step_time_p90_ms"] >= row["step_time_median_ms"] > 0
        assert row["compile_seconds"] > 0 and row["flops_per_step_per_device"] > 0
        assert row["mfu"] is None and row["device_kind"] == "cpu"  # no peak for a CPU: not guessed
        assert row["flags"]["batch_size"] == ["4", "8"] and row["data"] == "device"
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["model", "mode"] and len(table) == 4  # header, 2 rows, device line
    assert "compiling" in result.stderr and "compiling" not in result.stdout
    assert any(cache_dir.iterdir())  # the persistent cache was written


def test_eval_mode_fed_by_the_input_pipeline(cache_dir, restore_cache_settings):
    """Host-made synthetic batches through grain and `to_global`; a second run loads the compiled step."""
    from configs import default

    compile_cache.enable_compilation_cache(str(cache_dir), min_compile_seconds=0)
    options = benchmark.Options(
        models=("resnet20",), batch_sizes=(8,), image_sizes=(8,), mode="eval", data="synthetic", steps=3
    )
    first, second = (benchmark.run(options, default.get_config())[0] for _ in range(2))
    assert first["mode"] == "eval" and first["data"] == "synthetic" and first["images_per_sec"] > 0
    assert first["num_params"] > 0 and first["flops_per_image"] > 0
    # A load from the cache is reported as one, not passed off as a compile time.
    assert not first["compile_cache_hit"] and second["compile_cache_hit"]


def test_flops_and_mfu_of_a_single_convolution():
    n, h, w, c_in, c_out, k = 2, 10, 10, 3, 8, 3

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    lowered = jax.jit(conv).lower(
        jax.ShapeDtypeStruct((n, h, w, c_in), jnp.float32),
        jax.ShapeDtypeStruct((k, k, c_in, c_out), jnp.float32),
    )
    # Each of the n*8*8*c_out outputs takes k*k*c_in multiply-adds, 2 FLOPs each.
    by_hand = 2 * n * (h - k + 1) * (w - k + 1) * c_out * k * k * c_in
    assert costs.step_flops_per_device(lowered, 1) == by_hand == 55296
    assert costs.step_flops_per_device(lowered, 4) == by_hand / 4  # a data-parallel share
    # GPU and TPU plugins refuse to analyse a lowered program; XLA's CPU cost model counts it then.
    refusing = mock.Mock(wraps=lowered, _lowering=lowered._lowering)
    refusing.cost_analysis.side_effect = NotImplementedError("Lowered.cost_analysis not implemented")
    assert costs.xla_flops(refusing) == by_hand
    assert costs.mfu(by_hand, 1e-3, 1e9) == pytest.approx(by_hand / 1e-3 / 1e9)
    assert costs.mfu(by_hand, 1e-3, None) is None and costs.mfu(None, 1e-3, 1e9) is None


@pytest.mark.parametrize(
    "kind,dtype,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 80GB HBM3", "float32", 494.7),
        ("NVIDIA H100 PCIe", "bfloat16", 756),
        ("NVIDIA H200", "bfloat16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
        ("Tesla V100-SXM2-16GB", "float16", 125),
        ("NVIDIA L4", "bfloat16", 121),
        ("TPU v4", "bfloat16", 275),
        ("TPU v5 lite", "bfloat16", 197),
        ("TPU v5", "bfloat16", 459),
        ("TPU v6 lite", "bfloat16", 918),
        ("Tesla V100-SXM2-16GB", "bfloat16", None),
        ("NVIDIA H100 NVL", "bfloat16", None),
        ("NVIDIA GeForce RTX 4090", "bfloat16", None),
        ("cpu", "float32", None),
    ],
)
def test_peak_flops_table(kind, dtype, tflops):
    peak = costs.peak_flops_per_device(kind, dtype)
    assert peak == (pytest.approx(tflops * 1e12) if tflops else None)


def _options(**changes):
    base = dict(models=("resnet20",), batch_sizes=(8,), image_sizes=(8,))
    return benchmark.Options(**(base | changes))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(models=("resnet19",)), "--model='resnet19' is not valid; choose one of: resnet20, resnet32"),
        (dict(dtypes=("float64",)), "--dtype='float64' is not valid; choose one of: float32, bfloat16"),
        (dict(mode="predict"), "--mode='predict' is not valid; choose one of: train, eval"),
        (dict(per_device_batch_sizes=(4,)), "give --batch_size or --per_device_batch_size, not both"),
        (dict(batch_sizes=()), "give --batch_size (global) or --per_device_batch_size"),
        (dict(batch_sizes=(0,)), "--batch_size=0 must be a positive integer"),
        (dict(steps=0), "--steps=0 must be a positive integer"),
        (dict(peak_tflops=-1.0), "--peak_tflops=-1.0 must be a positive number"),
        (dict(data="mnist"), "--data='mnist' is not a dataset spec"),
    ],
)
def test_bad_options_are_clear_errors(changes, message):
    with pytest.raises(benchmark.BenchmarkError) as error:
        benchmark.plan(_options(**changes), parallel.create_mesh())
    assert message in str(error.value)


def test_sweep_is_every_combination():
    options = _options(models=("resnet20", "resnet32"), per_device_batch_sizes=(4, 8), batch_sizes=())
    cases = benchmark.plan(options, parallel.create_mesh())
    assert [(c.model, c.batch_size) for c in cases] == [
        ("resnet20", 4),
        ("resnet20", 8),
        ("resnet32", 4),
        ("resnet32", 8),
    ]
    with pytest.raises(benchmark.BenchmarkError, match="'x' is not an integer"):
        benchmark.parse_sizes("--batch_size", ["8", "x"])


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--model=resnet19,resnet20"], {}, "--model='resnet19' is not valid; choose one of: resnet20"),
        (
            ["--model=resnet20", "--batch_size=6"],
            {"XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=4")},
            "--batch_size=6 does not divide over 4 devices; use a multiple of 4 (e.g. 4 or 8)",
        ),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, env, message):
    result = run_script("benchmark.py", *args, "--image_size=8", f"--json={tmp_path / 'x.json'}", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


def test_compilation_cache_stores_compiled_programs(tmp_path, restore_cache_settings):
    assert compile_cache.enable_compilation_cache("") is None
    directory = compile_cache.enable_compilation_cache(str(tmp_path / "cache"), min_compile_seconds=0)
    assert directory == str(tmp_path / "cache")
    jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(7)).compile()
    assert any(name.endswith("-cache") for name in (p.name for p in (tmp_path / "cache").iterdir()))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(compile_cache.CompilationCacheError, match="cannot be used"):
        compile_cache.enable_compilation_cache(str(blocker / "cache"))
