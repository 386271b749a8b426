"""`benchmark.py --profile` and `python -m resnet_jax.trace_report`: a step's device time by category,
read from a real CPU trace of a small model (the GPU trace names cuDNN's convolutions the same way)."""

import json
import pathlib

import pytest

from resnet_jax import hlo_categories, trace_report
from resnet_jax.hlo_categories import Instruction, category
from tests.conftest import TINY_BENCHMARK, run_script


@pytest.mark.parametrize(
    "name, instruction, expected",
    [
        (
            "cudnn-conv.3",
            Instruction("custom-call", "__cudnn$convForward", "jit(s)/jvp(ResNet)/conv1/x", ()),
            "convolution forward",
        ),
        (
            "cudnn-conv.4",
            Instruction("custom-call", "__cudnn$convBackwardInput", "", ()),
            "convolution input gradient",
        ),
        (
            "cudnn-conv.5",
            Instruction("custom-call", "__cudnn$convBackwardFilter", "", ()),
            "convolution weight gradient",
        ),
        (
            "convolution.1",
            Instruction("convolution", "", "jit(s)/transpose(jvp(ResNet))/conv1/conv_general_dilated", ()),
            "convolution backward (input + weight)",
        ),
        (
            "fusion.9",
            Instruction("fusion", "", "jit(s)/mul", ("/x/optax/_src/transform.py", "/r/step.py")),
            "optimizer update",
        ),
        (
            "fusion.8",
            Instruction("fusion", "", "jit(s)/add", ("/x/optax/losses/_classification.py",)),
            "other fusions and ops",
        ),
        (
            "reduce.2",
            Instruction("reduce", "", "jit(s)/jvp(ResNet)/bn1/reduce_sum", ()),
            "BatchNorm statistics",
        ),
        ("fusion.7", Instruction("fusion", "", "jit(s)/jvp(ResNet)/layer1_0/bn2/mul", ()), "BatchNorm apply"),
        # resnet_jax's own BatchNorms (config.bn_form=affine), under a name without "bn" at its start.
        (
            "fusion.10",
            Instruction(
                "fusion",
                "",
                "jit(s)/jvp(ResNet)/layer2_0/shortcut/downsample_bn/mul",
                ("/r/resnet_jax/norms.py",),
            ),
            "BatchNorm apply",
        ),
        (
            "fusion.6",
            Instruction("fusion", "", "jit(s)/transpose(jvp(ResNet))/bn1/mul", ()),
            "BatchNorm backward",
        ),
        (
            "fusion.5",
            Instruction("fusion", "", "jit(s)/eq", ("/x/clu/metrics.py",)),
            "metrics and gradient norm",
        ),
        ("copy.4", Instruction("copy", "", "jit(s)/transpose", ()), "copies and transposes"),
        ("unknown.1", None, "other fusions and ops"),
        # Multi-GPU gradient reductions and layout copies carry the metadata of the convolution.
        (
            "all-reduce-start.1",
            Instruction(
                "all-reduce-start", "", "jit(s)/transpose(jvp(ResNet))/conv1/conv_general_dilated", ()
            ),
            "collectives (all-reduce, ...)",
        ),
        (
            "copy.9",
            Instruction("copy", "", "jit(s)/transpose(jvp(ResNet))/conv1/conv_general_dilated", ()),
            "copies and transposes",
        ),
        # A 1x1 convolution's input gradient reaches cuDNN as a forward convolution.
        (
            "cudnn-conv.6",
            Instruction("custom-call", "__cudnn$convForward", "jit(s)/transpose(jvp(ResNet))/l/conv3/c", ()),
            "convolution input gradient",
        ),
    ],
)
def test_each_op_is_put_in_its_category(name, instruction, expected):
    assert category(name, instruction) == expected


BATCH_NORM_FILES = ("/x/flax/linen/normalization.py",)


@pytest.mark.parametrize(
    "name, body, expected",
    [
        # XLA fuses the BatchNorm's normalisation into the ReLU that follows it.
        (
            "loop_maximum_fusion",
            [("multiply", "jit(s)/jvp(ResNet)/bn1/mul", BATCH_NORM_FILES)],
            "BatchNorm apply",
        ),
        (
            "input_reduce_fusion.3",
            [("reduce", "jit(s)/jvp(ResNet)/bn1/reduce_sum", BATCH_NORM_FILES)],
            "BatchNorm statistics",
        ),
        (
            "input_reduce_select_fusion",
            [
                ("select", "jit(s)/transpose(jvp(ResNet))/relu/max", ()),
                ("reduce", "jit(s)/jvp(ResNet)/bn1/x", ()),
            ],
            "BatchNorm backward",
        ),
        (
            "input_transpose_fusion.2",
            [("parameter", "", ()), ("transpose", "", ()), ("convert", "", ())],
            "copies and transposes",
        ),
        ("input_add_fusion", [("add", "jit(s)/add", ("/x/optax/_src/transform.py",))], "optimizer update"),
        ("loop_convert_fusion", [("parameter", "", ()), ("convert", "", ())], "other fusions and ops"),
    ],
)
def test_a_fusion_is_put_in_the_category_of_what_is_fused_into_it(name, body, expected):
    instructions = tuple(Instruction(opcode, "", op_name, files) for opcode, op_name, files in body)
    fusion = Instruction("fusion", "", "jit(s)/jvp(ResNet)/relu/max", (), body=instructions)
    assert category(name, fusion) == expected


def test_a_per_leaf_gradient_norm_is_a_metric_by_its_python_function():
    square = Instruction(
        "reduce", "", "jit(s)/reduce_sum", ("/r/step.py",), ("global_norm.<locals>.<genexpr>",)
    )
    assert category(
        "input_reduce_fusion.1", Instruction("fusion", "", "jit(s)/reduce_sum", (), body=(square,))
    ) == ("metrics and gradient norm")


HANDMADE_HLO = (pathlib.Path(__file__).parent / "data" / "fused_step.hlo.txt").read_text()


def test_read_hlo_gives_a_fusion_its_body_and_each_instruction_its_stack():
    instructions = hlo_categories.read_hlo(HANDMADE_HLO)
    fusion = instructions["loop_maximum_fusion"]
    (multiply,) = [i for i in fusion.body if i.opcode == "multiply"]
    assert [i.opcode for i in fusion.body] == ["parameter", "multiply"]
    assert multiply.files == ("/r/step.py", "/x/flax/linen/normalization.py")
    assert multiply.functions == ("global_norm", "__call__")
    assert (
        instructions["p"].body == ()
        and category("loop_maximum_fusion", fusion) == "metrics and gradient norm"
    )


def test_busy_time_counts_overlapping_ops_once():
    assert trace_report.busy_time([(0, 4), (2, 6), (8, 9), (8.5, 8.7)]) == 7


def test_benchmark_profile_writes_a_trace_that_the_reader_turns_into_a_table(tmp_path):
    out, rows_json, report_json = tmp_path / "profile", tmp_path / "rows.json", tmp_path / "report.json"
    result = run_script(
        *TINY_BENCHMARK,
        f"--profile={out}",
        "--profile_steps=3",
        f"--json={rows_json}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convolution forward" in result.stderr and "idle between ops" in result.stderr
    (row,) = json.loads(rows_json.read_text())
    categories = {r["category"]: r for r in row["profile"]["rows"]}
    for needed in ("convolution forward", "convolution backward (input + weight)", "optimizer update"):
        assert categories[needed]["ms_per_step"] > 0, needed
    assert sum(r["share"] for r in categories.values()) == pytest.approx(1.0)
    directory = row["profile"]["directory"]
    again = run_script("-m", "resnet_jax.trace_report", directory, f"--json={report_json}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0].split()[:4] == ["category", "ms/step", "share", "kernels/step"]
    document = json.loads(report_json.read_text())
    assert document["steps"] == 3 and document["rows"] == row["profile"]["rows"]
    # The bytes each op moves over its time: the bandwidth it reached, where it moved any.
    assert (
        categories["convolution forward"]["gb_per_s"] > 0
        and categories["convolution forward"]["kernels_per_step"] >= 1
    )
    assert categories["idle between ops"]["gb_per_s"] is None

    # The same step's compiled program, read without running it: its kernels and their bytes.
    (program,) = pathlib.Path(directory).glob("*.hlo.txt")
    census = run_script(
        "-m", "resnet_jax.trace_report", f"--hlo={program}", "--images=8", "--accelerator=H200"
    )
    assert census.returncode == 0, census.stderr
    assert "convolution forward" in census.stdout and "at the H200's HBM bandwidth" in census.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hlo=/nonexistent.hlo.txt"], "--hlo '/nonexistent.hlo.txt' does not exist"),
        (
            ["--hlo=x.hlo.txt", "--accelerator=H900"],
            "--accelerator='H900' is not valid; choose one of: H100 SXM",
        ),
        (["somewhere", "--hlo=x.hlo.txt"], "give a profile folder or --hlo FILE, not both"),
        (["--hlo=x.hlo.txt", "--images=0"], "--images=0 must be a positive number of images per device"),
    ],
)
def test_bad_census_arguments_are_one_line(args, message):
    result = run_script("-m", "resnet_jax.trace_report", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_folder_without_a_trace_is_one_line(tmp_path):
    result = run_script("-m", "resnet_jax.trace_report", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {str(tmp_path)!r} holds no jax.profiler trace (plugins/profile/*/*.trace.json.gz); "
        "write one with `python benchmark.py --profile DIR ...`"
    )
