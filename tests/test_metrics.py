"""What a run shows its user: TensorBoard event files (scalars, hparams, images), metrics averaged
over devices, the parameter table, the progress line and the profiler trace."""

import io
import json
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_jax import compiled_steps, data, metrics, progress, train, writers
from tests.conftest import digits_config, run_script, xla_flags_with

STEPS = 6


def digits_run_config():
    """Logs at 3, 6; evals at 3, 6; profiles steps 2-3; warmup clipped to 5 of the 6 steps."""
    return digits_config(
        num_train_steps=STEPS,
        batch_size=32,
        log_every_steps=3,
        eval_every_steps=3,
        profile_steps="2:3",
        eval_images=8,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short digits run, shared by the tests."""
    workdir = tmp_path_factory.mktemp("digits_run")
    train.train_and_evaluate(digits_run_config(), str(workdir))
    return workdir


def read_events(logdir):
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def run_events(workdir):
    return read_events(workdir / "tensorboard" / workdir.name)


def hparams_plugin_data(events):
    """(experiment, session start info) as TensorBoard's hparams plugin reads them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    read = lambda tag: plugin_data_pb2.HParamsPluginData.FromString(content[tag])
    return read("_hparams_/experiment").experiment, read("_hparams_/session_start_info").session_start_info


@pytest.mark.slow
def test_tensorboard_groups_the_metrics_jsonl_scalars_at_their_steps(digits_run):
    events = run_events(digits_run)
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                expected.setdefault(writers.tensorboard_tag(key), []).append((row["step"], value))
    assert set(events.Tags()["scalars"]) == set(expected)
    assert {tag.split("/")[0] for tag in expected} == {"train", "eval"}  # two sections, no flat tags
    for tag in ("train/loss", "train/accuracy", "train/top5_accuracy", "train/learning_rate"):
        assert [s for s, _ in expected[tag]] == [3, 6]
    for tag in ("eval/loss", "eval/accuracy", "eval/top5_accuracy"):
        assert [s for s, _ in expected[tag]] == [3, 6]
    for tag, points in expected.items():
        read = {e.step: e.value for e in events.Scalars(tag)}
        np.testing.assert_allclose([read[s] for s, _ in points], [v for _, v in points], rtol=1e-6)
        if tag != "train/learning_rate":
            assert sorted(read) == [s for s, _ in points], tag


@pytest.mark.slow
def test_tensorboard_has_the_schedules_learning_rate_at_every_step(digits_run):
    config = digits_run_config()
    _, _, schedule = compiled_steps.model_and_optimizer(config, data.load(config).info, "cpu")
    rates = run_events(digits_run).Scalars("train/learning_rate")
    assert [e.step for e in rates] == list(range(1, STEPS + 1))
    # Step s is the s-th update, made with the schedule's rate at s - 1 (warmup starts at 0).
    expected = [float(schedule(step - 1)) for step in range(1, STEPS + 1)]
    np.testing.assert_allclose([e.value for e in rates], expected, rtol=1e-6)
    assert len(set(expected)) == STEPS  # warmup: a window average or a repeated value would fail


@pytest.mark.slow
def test_tensorboard_names_the_run_after_its_workdir(digits_run):
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    for logdir, run in (
        (digits_run / "tensorboard", digits_run.name),
        (digits_run, f"tensorboard/{digits_run.name}"),
    ):
        multiplexer = plugin_event_multiplexer.EventMultiplexer()
        multiplexer.AddRunsFromDirectory(str(logdir))
        assert list(multiplexer.Runs()) == [run]


@pytest.mark.slow
def test_hparams_lead_with_the_run_and_eval_images_are_captioned(digits_run):
    from tensorboard.plugins.hparams import backend_context

    events = run_events(digits_run)
    experiment, start = hparams_plugin_data(events)
    backend_context._sort_and_reduce_to_hparams_limit(experiment)  # TensorBoard's column order
    columns = [info.display_name or info.name for info in experiment.hparam_infos]
    assert columns[:7] == ["model", "optimizer", "learning_rate", "batch_size", "epochs", "dtype", "dataset"]
    assert columns[7:] == sorted(columns[7:]) and "data_dir" not in columns  # unset: left out
    value = {info.display_name: start.hparams[info.name] for info in experiment.hparam_infos}
    assert value["model"].string_value == "resnet20" and value["dataset"].string_value == "digits"
    assert value["learning_rate"].number_value == 0.1 and value["batch_size"].number_value == 32
    assert value["epochs"].number_value == pytest.approx(STEPS / (1437 // 32))
    assert value["profile_steps"].string_value == "2:3"
    assert not [name for name, v in start.hparams.items() if v.string_value == "None"]
    assert [m.name.tag for m in experiment.metric_infos] == list(writers.HPARAM_METRICS)
    images = events.Images("eval/predictions")
    assert [i.step for i in images] == [3, 6]
    assert (images[0].width, images[0].height) == (4 * 64, 2 * (64 + 14))  # 8 images, 4 per row


@pytest.mark.slow
def test_profile_steps_writes_a_trace_and_the_parameter_table_is_written(digits_run):
    traces = list((digits_run / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list((digits_run / "profile").glob("plugins/profile/*/*.trace.json.gz"))  # Perfetto
    table = (digits_run / "parameters.txt").read_text()
    assert "conv1/kernel" in table and "(3, 3, 1, 16)" in table
    assert table.strip().splitlines()[-1].startswith("Total: 269,434")


# Run with 8 virtual CPU devices: a batch of 32 sharded 4 per device, with masks that leave the
# devices very unequal (4, 3, 1, 0, ... valid examples), over two batches. The per-device mean of
# means differs from the right answer by several percent, so a wrong reduction fails.
MASKED_AVERAGE = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from resnet_jax import compiled_steps, metrics, parallel

    mesh = parallel.create_mesh()
    sharding = parallel.data_sharding(mesh)
    assert mesh.devices.size == 8
    rng = np.random.default_rng(0)
    step = jax.jit(lambda b: metrics.EvalMetrics.single_from_model_output(
        loss=b["loss"], logits=b["logits"], labels=b["label"],
        top5_correct=metrics.top5_correct(b["logits"], b["label"]), mask=b["mask"]))
    train = jax.jit(lambda b: metrics.TrainMetrics.single_from_model_output(
        loss=b["loss"].mean(), logits=b["logits"], labels=b["label"], learning_rate=0.1,
        grad_norm=1.0, nonfinite=0))
    masks = [[1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0] + [0] * 20, [0] * 28 + [1, 1, 0, 1]]
    collected, trained, batches = [], [], []
    for mask in masks:
        batch = {"logits": rng.normal(size=(32, 10)).astype(np.float32),
                 "label": rng.integers(0, 10, 32).astype(np.int32),
                 "loss": rng.uniform(0, 3, 32).astype(np.float32),
                 "mask": np.asarray(mask, np.float32)}
        batches.append(batch)
        collected.append(step(parallel.to_global(batch, sharding)))
        trained.append(train(parallel.to_global(batch, sharding)))
    result = {k: float(v) for k, v in metrics.merge_all(collected).compute().items()}
    result.update({"train_" + k: float(v) for k, v in metrics.merge_all(trained).compute().items()})
    result["count"] = int(metrics.merge_all(collected).accuracy.count)
    result["batches"] = [{k: v.tolist() for k, v in b.items()} for b in batches]
    print(json.dumps(result))
    """
)


@pytest.mark.slow
def test_metrics_average_exactly_over_devices_with_uneven_masks():
    env = {"XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    result = run_script("-c", MASKED_AVERAGE, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in got["batches"]]
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    logits = np.concatenate([b["logits"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    loss = np.concatenate([b["loss"] for b in batches])
    correct = logits.argmax(-1) == labels
    top5 = (np.argsort(-logits, -1)[:, :5] == labels[:, None]).any(-1)
    assert got["count"] == mask.sum() == 11
    np.testing.assert_allclose(got["loss"], loss[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], correct[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["top5_accuracy"], top5[mask].mean(), rtol=1e-6)
    # Train metrics: every example counts; the loss is the mean of the two steps' means.
    np.testing.assert_allclose(got["train_accuracy"], correct.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["train_top5_accuracy"], top5.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["train_loss"], np.mean([b["loss"].mean() for b in batches]), rtol=1e-6)
    # The check can fail: averaging per device first gives another number.
    per_device = [loss[i : i + 4][mask[i : i + 4]].mean() for i in range(0, 64, 4) if mask[i : i + 4].any()]
    assert abs(np.mean(per_device) - loss[mask].mean()) > 0.01


def test_top5_accuracy_counts_only_unmasked_examples():
    logits = jnp.array([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [5.0, 4, 3, 2, 1, 0]])
    labels = jnp.array([1, 0, 5], jnp.int32)  # top-5 of 6 classes: hit, (masked) hit, miss
    m = metrics.Top5Accuracy.from_model_output(logits=logits, labels=labels, mask=jnp.array([1, 0, 1]))
    assert float(m.compute()) == 0.5 and int(m.count) == 2


def test_writers_write_nothing_on_other_processes_and_flatten_configs(tmp_path):
    writer = writers.create_writer(str(tmp_path), enabled=False)
    writer.write_scalars(1, {"train_loss": 1.0})
    writer.write_hparams({"a": {"b": None}})
    writer.close()
    assert not list(tmp_path.iterdir())
    flat = writers.flatten({"model": "resnet20", "lr": 0.1, "nested": {"k": 3, "none": None, "t": (1, 2)}})
    assert flat == {"model": "resnet20", "lr": 0.1, "nested.k": 3, "nested.t": "(1, 2)"}


def test_metrics_jsonl_keys_map_to_grouped_tags_and_back():
    keys = ["train_loss", "train_top5_accuracy", "learning_rate", "images_per_sec", "eval_accuracy"]
    tags = [writers.tensorboard_tag(key) for key in keys]
    assert tags == [
        "train/loss",
        "train/top5_accuracy",
        "train/learning_rate",
        "train/images_per_sec",
        "eval/accuracy",
    ]
    assert [writers.metrics_key(tag) for tag in tags] == keys
    assert [writers.metrics_key(key) for key in keys] == keys  # keys pass through
    assert writers.tensorboard_tag("config") == "config" == writers.metrics_key("config")


def test_multi_writer_sends_every_call_to_each_writer(tmp_path, capsys):
    workdir = tmp_path / "my_run"
    workdir.mkdir()
    writer = writers.create_writer(str(workdir), stdout=True)
    writer.write_hparams({"model": "resnet20"})
    history = {"learning_rate": [0.3, 0.2, 0.1]}  # steps 3, 4, 5
    writer.write_scalars(5, {"train_loss": np.float32(0.5), "learning_rate": 0.1}, history)
    writer.write_images(5, {"eval_predictions": np.zeros((4, 4, 3), np.uint8)})
    writer.close()
    assert json.loads((workdir / "metrics.jsonl").read_text()) == {
        "step": 5,
        "train_loss": 0.5,
        "learning_rate": 0.1,
    }
    out = capsys.readouterr().out
    assert "step 5 | train_loss 0.5 | learning_rate 0.1" in out and "hparams: model=resnet20" in out
    events = read_events(workdir / "tensorboard" / "my_run")
    assert events.Tags()["images"] == ["eval/predictions"] and events.Scalars("train/loss")[0].step == 5
    rates = [(e.step, e.value) for e in events.Scalars("train/learning_rate")]
    assert rates == [(3, pytest.approx(0.3)), (4, pytest.approx(0.2)), (5, pytest.approx(0.1))]


def test_prediction_grid_tiles_images_with_captions():
    images = np.full((5, 8, 8, 1), 255, np.uint8)
    grid = writers.prediction_grid(images, [0, 1, 2, 3, 4], [0, 1, 0, 3, 4], [str(i) for i in range(5)])
    assert grid.shape == (2 * (64 + 14), 4 * 64, 3) and grid.dtype == np.uint8
    caption = grid[64 : 64 + 14, 2 * 64 : 3 * 64]  # the third image was predicted wrong: red text
    assert ((caption[..., 0] > 150) & (caption[..., 1] < 80)).any()


@pytest.mark.parametrize("value", ["5", "5:", "a:b", "0:3", "4:2", "1:2:3"])
def test_bad_profile_steps_name_the_value_and_the_form(value):
    from resnet_jax.config_checks import ConfigError, check_config

    with pytest.raises(ConfigError, match=rf"config.profile_steps='{value}'.*'START:END'"):
        check_config(digits_config(profile_steps=value))


def test_progress_reports_an_eta_from_the_steady_rate_and_a_bar_only_on_a_terminal(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.Progress(total_steps=10, start_step=0, steps_per_epoch=5, batch_size=8, stream=sys.stdout)
    assert not bar.use_bar  # pytest captures stdout: not a terminal
    bar.step(1)  # the compile step starts the clock at t=100
    now[0] = 101.0
    bar.step(2)
    assert bar.eta_text(2) == " | ETA 0:08"  # 1 step/s, 8 steps left
    bar.pause()
    now[0] = 111.0  # an eval of 10 s does not count
    bar.resume()
    assert bar.eta_text(2) == " | ETA 0:08"
    assert bar.eta_text(10) == ""
    assert progress.format_seconds(3725) == "1:02:05"


def test_progress_bar_on_a_terminal_shows_steps_epoch_and_images_per_second(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm")
    terminal = Terminal()
    bar = progress.Progress(total_steps=10, start_step=0, steps_per_epoch=5, batch_size=8, stream=terminal)
    for step in (1, 2, 3):
        bar.step(step)
    progress.write("a log line")  # printed above the bar
    bar.close()
    out = terminal.getvalue()
    assert "a log line" in out and "3/10" in out and "epoch 0.6" in out and "img/s" in out


@pytest.mark.slow
def test_plot_draws_the_curves_of_a_real_run(digits_run, tmp_path):
    from resnet_jax import plot

    out = tmp_path / "curves.png"
    plot.plot_runs([str(digits_run)], str(out))
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
