"""Loading: hub ids from the offline cache, local folders, helpful errors; device and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import HQ_ID, make_picture

from segmentation import CATALOG, ModelUnavailableError, Segmenter, UnknownModelError
from segmentation.models import cpu_quota, fit_cpu_threads, load_model, parse_dtype, resolve_device, resolve_spec
from segmentation.offline import save_random_checkpoint


def test_catalog_lists_hq_and_plain_sam():
    assert {spec.family for spec in CATALOG.values()} == {"sam_hq", "sam"}
    assert CATALOG[HQ_ID].hq and CATALOG[HQ_ID].encoder == "ViT-B"
    assert len(CATALOG) == 6


def test_hub_id_loads_offline_from_the_cache(segmenter, hf_home):
    assert segmenter.model_id == HQ_ID
    assert type(segmenter.model).__name__ == "SamHQModel"
    assert segmenter.dtype == torch.float32 and segmenter.device.type == "cpu"


def test_absent_catalog_model_fails_with_how_to_provide_it():
    with pytest.raises(ModelUnavailableError) as info:
        load_model("syscv-community/sam-hq-vit-large", "cpu")
    message = str(info.value)
    assert "syscv-community/sam-hq-vit-large" in message
    assert "HF_HUB_OFFLINE" in message and "HF_HOME" in message
    assert "hf download" in message and "HF_HUB_OFFLINE=1" in message and "local folder" in message


FIRST_RUN_WITHOUT_HUB = """
import sys, time
from transformers import AutoProcessor, SamHQModel  # imported before the clock starts: slow on a loaded machine
from segmentation.models import load_model
from segmentation.errors import ModelUnavailableError
start = time.perf_counter()
try:
    load_model(sys.argv[1])
except ModelUnavailableError as error:
    print(f"{time.perf_counter() - start:.2f}")
    print(error.message)
"""


@pytest.mark.parametrize("cached", [False, True])
def test_a_first_run_with_the_hub_out_of_reach_answers_at_once_from_the_cache(hf_home, tmp_path, cached):
    """Not in offline mode, the hub unreachable (a closed loopback port): the cache answers at once,
    where huggingface_hub alone would retry each file for ~40 s before giving up."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from live_server import free_port

    env = {
        **{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"},
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "HF_HOME": str(hf_home if cached else tmp_path),
    }
    script = FIRST_RUN_WITHOUT_HUB + ("print('loaded')" if cached else "")
    out = subprocess.run(
        [sys.executable, "-c", script, HQ_ID],
        env=env,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stdout.splitlines()
    if cached:
        assert lines == ["loaded"], out.stderr[-2000:]
        return
    seconds, message = float(lines[0]), "\n".join(lines[1:])
    assert seconds < 10, f"took {seconds} s: the hub's retries were not skipped"
    assert "could not be reached" in message and f"hf download {HQ_ID}" in message
    assert "Retrying" not in out.stderr


def test_unknown_name_lists_the_catalog():
    with pytest.raises(UnknownModelError, match="Supported models: syscv-community/sam-hq-vit-base"):
        resolve_spec("someone/else")


def test_local_folder_loads_and_its_family_is_read_from_config(tmp_path):
    folder = save_random_checkpoint(tmp_path / "ckpt", "sam", "tiny", seed=4)
    segmenter = Segmenter.from_pretrained(str(folder), device="cpu")
    assert not segmenter.hq
    result = segmenter.segment_image(make_picture(40, 30), [[[5, 5]]])
    assert result.best.labels.shape == (30, 40)


def test_corrupt_weights_fail_with_a_clear_error(tmp_path):
    folder = save_random_checkpoint(tmp_path / "ckpt", "sam_hq", "tiny")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        load_model(str(folder), "cpu")


def test_folder_without_config_and_other_model_types(tmp_path):
    with pytest.raises(ModelUnavailableError, match="config.json"):
        resolve_spec(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnknownModelError, match="'bert'"):
        resolve_spec(str(tmp_path))


def test_device_and_dtype_choices():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("tpu-please")
    assert parse_dtype("auto") is None
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        parse_dtype("int4")


def test_reduced_precision_is_used_only_where_masks_agree(segmenter):
    from segmentation.precision import masks_agree

    agree, iou = masks_agree(segmenter, segmenter)
    assert agree and iou == 1.0
    chosen = segmenter.with_precision_if_agreeing(torch.bfloat16, min_iou=1.01)  # impossible bar
    assert chosen is segmenter
    chosen = segmenter.with_precision_if_agreeing(torch.bfloat16, min_iou=0.0)
    assert chosen.dtype == torch.bfloat16
    assert chosen.segment_image(make_picture(40, 30), [[[5, 5]]]).best.labels.shape == (30, 40)


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_masks():
    picture = make_picture(64, 48, seed=9)
    plain = Segmenter.from_pretrained(HQ_ID, device="cpu")
    compiled = Segmenter.from_pretrained(HQ_ID, device="cpu", compile=True)
    assert type(compiled.model.vision_encoder).__name__ == "OptimizedModule"
    a, b = plain.embed(picture), compiled.embed(picture)
    torch.testing.assert_close(a.features.tokens, b.features.tokens, atol=1e-4, rtol=1e-4)
    np_a = plain.segment(a, [[[10, 10]]]).best.labels
    np_b = compiled.segment(b, [[[10, 10]]]).best.labels
    assert (np_a != np_b).mean() < 0.001


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: round up
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_reads_both_cgroup_versions(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_cpu_threads_fit_the_quota_and_honour_a_request(tmp_path):
    before = torch.get_num_threads()
    (tmp_path / "cpu.max").write_text("100000 100000")  # one CPU's worth of time
    try:
        torch.set_num_threads(4)  # what torch picks on a many-core host
        assert fit_cpu_threads(0, tmp_path) == 1
        assert fit_cpu_threads(3, tmp_path) == 3  # an explicit request wins
        (tmp_path / "cpu.max").write_text("max 100000")
        torch.set_num_threads(1)
        assert fit_cpu_threads(0, tmp_path) == 1  # never raised above torch's own choice
        with pytest.raises(ValueError, match="must be 0"):
            fit_cpu_threads(-2, tmp_path)
    finally:
        torch.set_num_threads(before)
