"""SAM-HQ point segmentation: the Gradio UI and the HTTP API on one port.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model ID] [--models ID,ID] [--device auto]

The UI lives here and only here; it calls the engine (`segmentation.service` / `Segmenter`) and the
picture helpers (`segmentation.visualize`, `segmentation.export`). No torch code in this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastapi import FastAPI

from segmentation import export, service, visualize
from segmentation.api import APIError, decode_base64_image, install_api
from segmentation.errors import SegmentationError
from segmentation.masks import encode_png, resize_nearest
from segmentation.models import CATALOG, fit_cpu_threads
from segmentation.schemas import build_response
from segmentation.service import ModelRegistry, SegmentResult
from segmentation.settings import Settings

log = logging.getLogger("app")

ASSETS = Path(__file__).parent / "assets"
PREVIEW_SIDE = 1024  # the clickable picture and the result views are at most this large
INCLUDE, EXCLUDE = "Include (+)", "Exclude (−)"


def example_pictures() -> list[str]:
    return sorted(str(path) for path in ASSETS.glob("*.jpg"))


def _spaces_gpu(fn):
    """On ZeroGPU hardware, run `fn` with a GPU attached; a no-op everywhere else."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# ---- session state ------------------------------------------------------------------------------


def new_state(model: str) -> dict[str, Any]:
    """Everything one visitor's session holds (gr.State: never shared between sessions)."""
    return {
        "model": model,
        "key": None,  # the picture's embedding cache key: no re-hashing per click
        "rgb": None,  # the upright picture, to re-embed if the cache evicted it
        "name": "picture.jpg",
        "objects": [{"points": [], "labels": [], "choice": 0}],
        "active": 0,
        "seq": 0,  # bumped by every click; a result computed for an older one is dropped
        "result": None,  # the last label map (full size) and its objects, for export
        "decoded": None,  # the last decode: choosing a candidate or restyling reuses it, no second decode
    }


def _prompt_objects(state: dict) -> list[tuple[int, dict]]:
    return [(index, obj) for index, obj in enumerate(state["objects"]) if obj["points"]]


def object_names(state: dict) -> list[str]:
    return [f"Object {index + 1}" for index in range(len(state["objects"]))]


def add_point(state: dict, x: float, y: float, include: bool) -> dict:
    obj = state["objects"][state["active"]]
    obj["points"].append([round(float(x), 2), round(float(y), 2)])
    obj["labels"].append(1 if include else 0)
    obj["choice"] = 0  # a new point changes the candidates
    return state


def start_new_object(state: dict) -> dict:
    """Next object; an empty active object is reused rather than piling up empty ones."""
    if state["objects"][state["active"]]["points"]:
        state["objects"].append({"points": [], "labels": [], "choice": 0})
        state["active"] = len(state["objects"]) - 1
    return state


def select_object(state: dict, name: str | None) -> dict:
    if name and name in object_names(state):
        state["active"] = object_names(state).index(name)
    return state


def undo_point(state: dict) -> dict:
    obj = state["objects"][state["active"]]
    if obj["points"]:
        obj["points"].pop()
        obj["labels"].pop()
        obj["choice"] = 0
    elif len(state["objects"]) > 1:  # undo on an empty new object goes back to the previous one
        state["objects"].pop(state["active"])
        state["active"] = max(0, state["active"] - 1)
    return state


def clear_object(state: dict) -> dict:
    state["objects"][state["active"]] = {"points": [], "labels": [], "choice": 0}
    return state


def clear_all(state: dict) -> dict:
    state["objects"] = [{"points": [], "labels": [], "choice": 0}]
    state["active"] = 0
    state["result"] = None
    state["decoded"] = None
    return state


def choose_candidate(state: dict, index: int) -> dict:
    state["objects"][state["active"]]["choice"] = int(index)
    return state


# ---- the app -------------------------------------------------------------------------------------


class SegmentationUI:
    """Event handlers over a ModelRegistry; `build()` wires them into a gr.Blocks."""

    def __init__(self, registry: ModelRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings

    # engine access with readable errors
    def segmenter(self, model: str):
        try:
            return self.registry.get(model)
        except SegmentationError as error:
            raise gr.Error(error.message, title="Model not available") from error

    def embedding(self, state: dict):
        """The session picture's embedding: from the cache by key, re-computed only if evicted."""
        segmenter = self.segmenter(state["model"])
        cached = segmenter.cached(state["key"]) if state["key"] else None
        if cached is not None:
            return segmenter, cached, True
        embedding, was_cached = segmenter.embed_with_info(state["rgb"])
        state["key"] = embedding.key
        return segmenter, embedding, was_cached

    # -- picture --
    def load_picture(self, path: str | None, state: dict, progress=gr.Progress()):
        """Decode and embed at once, so the first click is already fast."""
        state = clear_all(state)
        if not path:
            state.update(key=None, rgb=None)
            return (None, *self._empty_views(), state, "Upload a picture or pick an example to start.")
        segmenter = self.segmenter(state["model"])
        progress(0.05, desc="Reading the picture…")
        try:
            rgb = segmenter.prepare(path)
        except SegmentationError as error:
            raise gr.Error(error.message, title="This picture cannot be used") from error
        progress(0.2, desc="Computing the image embedding (the slow part; clicks are fast after this)…")
        start = time.perf_counter()
        try:
            embedding, cached = segmenter.embed_with_info(rgb)
        except SegmentationError as error:
            raise gr.Error(error.message) from error
        seconds = time.perf_counter() - start
        state.update(key=embedding.key, rgb=rgb, name=Path(path).name)
        width, height = rgb.shape[1], rgb.shape[0]
        how = "from the cache" if cached else f"computed in {seconds:.2f} s"
        status = f"Picture {width}×{height} ready — embedding {how}. Click on it to add a point."
        return (self._canvas(state), *self._empty_views(), state, status)

    def load_example(self, state: dict, evt: gr.SelectData, progress=gr.Progress()):
        return self.load_picture(example_pictures()[evt.index], state, progress)

    def change_model(self, model: str, state: dict, progress=gr.Progress()):
        state["model"] = model
        state["key"] = state["decoded"] = None
        if state["rgb"] is None:
            return (gr.skip(), state, f"Model set to {model}.")
        segmenter = self.segmenter(model)
        progress(0.2, desc=f"Embedding the picture with {model}…")
        embedding, _ = segmenter.embed_with_info(state["rgb"])
        state["key"] = embedding.key
        return (self._canvas(state), state, f"Model set to {model}; the picture is embedded. Click to segment.")

    # -- clicks --
    def click(self, state: dict, mode: str, hq_only: bool, opacity: float, evt: gr.SelectData):
        if state["rgb"] is None:
            raise gr.Error("Upload a picture first, or pick one of the examples.", title="No picture")
        scale = self._scale(state)
        x, y = evt.index[0] / scale, evt.index[1] / scale
        width, height = state["rgb"].shape[1], state["rgb"].shape[0]
        state = add_point(state, min(max(x, 0), width - 1), min(max(y, 0), height - 1), mode != EXCLUDE)
        return self.render(state, hq_only, opacity)

    def render(self, state: dict, hq_only: bool, opacity: float):
        """Segment the session's prompt and draw every view. Stale results (a newer click came) are dropped."""
        state["seq"] += 1
        seq = state["seq"]
        outputs = self._render(state, hq_only, opacity)
        if state["seq"] != seq:
            return tuple(gr.skip() for _ in outputs)
        return outputs

    def _render(self, state: dict, hq_only: bool, opacity: float):
        names = object_names(state)
        selector = gr.update(choices=names, value=names[state["active"]])
        if state["rgb"] is None:
            return (None, *self._empty_views(), selector, state, "Upload a picture first.")
        prompted = _prompt_objects(state)
        if not prompted:
            state["result"] = None
            return (self._canvas(state), *self._empty_views(), selector, state, "No points yet: click on the picture.")
        start = time.perf_counter()
        segmenter, embedding, cached = self.embedding(state)
        prompt = [obj["points"] for _, obj in prompted]
        labels = [obj["labels"] for _, obj in prompted]
        base = [obj["choice"] for _, obj in prompted]
        positions = [index for index, _ in prompted]
        active_pos = positions.index(state["active"]) if state["active"] in positions else None
        ambiguous = active_pos is not None and len(prompt[active_pos]) == 1
        plans = [base[:active_pos] + [i] + base[active_pos + 1 :] for i in range(3)] if ambiguous else [base]
        try:
            kept = state.get("decoded")
            decoded = segmenter.decode(embedding, prompt, labels, hq_token_only=hq_only, reuse=kept)
            reused = decoded is kept
            if not reused:
                decoded = state["decoded"] = decoded.on_host()
            result = segmenter.compose(embedding, decoded, choices=plans)
        except SegmentationError as error:
            raise gr.Error(error.message) from error
        chosen = result.candidates[base[active_pos] if ambiguous else 0]
        state["result"] = {
            "map": chosen,
            "prompt": prompt,
            "point_labels": labels,
            "cached": cached,
            "image_tokens": embedding.grid_tokens,
        }
        # views at preview size; colours follow the object's number even when an earlier one is empty
        pw, ph = visualize.preview_size(embedding.width, embedding.height, PREVIEW_SIDE)
        preview_rgb = visualize.resize_rgb(state["rgb"], pw, ph)
        recolored = self._by_object(resize_nearest(chosen.labels, pw, ph), positions)
        views = (
            visualize.overlay(preview_rgb, recolored, opacity),
            visualize.mask_view(recolored),
            visualize.cutout(preview_rgb, recolored),
        )
        gallery = []
        if ambiguous:
            value = state["active"] + 1
            for i, candidate in enumerate(result.candidates):
                small = self._by_object(resize_nearest(candidate.labels, pw, ph), positions)
                score = candidate.objects[active_pos].score
                gallery.append(
                    (visualize.thumbnail(preview_rgb, small, value), f"Candidate {i + 1} · score {score:.3f}")
                )
        legend = visualize.legend_html(self._legend_rows(state, chosen, positions), state["active"])
        total = time.perf_counter() - start
        decoder = "decoder: same prompt, reused" if reused else f"decoder {decoded.timings['decoder'] * 1e3:.0f} ms"
        status = (
            f"{len(prompt)} object(s) · {decoder} · click-to-result {total * 1e3:.0f} ms · "
            f"embedding {'cached' if cached else 're-computed (evicted)'} · {segmenter.model_id}"
        )
        return (self._canvas(state), *views, legend, gallery, selector, state, status)

    def choose(self, state: dict, hq_only: bool, opacity: float, evt: gr.SelectData):
        return self.render(choose_candidate(state, evt.index), hq_only, opacity)

    def edit(self, action):
        def handler(state: dict, hq_only: bool, opacity: float, *rest):
            return self.render(action(state, *rest), hq_only, opacity)

        return _spaces_gpu(handler)

    # -- exports --
    def export(self, state: dict):
        """The downloads: mask PNG (the API's bytes), objects JSON (RLE + polygons), response JSON, API snippet."""
        result = state.get("result")
        if result is None:
            raise gr.Error("Nothing to export yet: add at least one point.", title="No mask")
        chosen = result["map"]
        folder = Path(tempfile.mkdtemp(prefix="samhq-export-"))
        mask_path = folder / "mask.png"
        mask_path.write_bytes(encode_png(chosen.labels))
        prompt = [{"points": p, "labels": lab} for p, lab in zip(result["prompt"], result["point_labels"])]
        objects_path = folder / "objects.json"
        objects_path.write_text(
            json.dumps(export.objects_document(chosen.labels, chosen.objects, prompt, state["model"]))
        )
        summary = SegmentResult(
            model=state["model"],
            width=chosen.labels.shape[1],
            height=chosen.labels.shape[0],
            candidates=(chosen,),
            embedding_cached=result["cached"],
            image_tokens=result["image_tokens"],
            point_tokens=sum(len(p) for p in result["prompt"]),
        )
        response_path = folder / "response.json"
        response_path.write_text(build_response(summary).model_dump_json(indent=1))
        base_url = os.environ.get("SAMHQ_PUBLIC_URL", f"http://{self.settings_host()}")
        snippet = export.api_snippets(base_url, state["model"], result["prompt"], result["point_labels"], state["name"])
        return str(mask_path), str(objects_path), str(response_path), snippet

    def settings_host(self) -> str:
        host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
        return f"{'127.0.0.1' if host == '0.0.0.0' else host}:{os.environ.get('GRADIO_SERVER_PORT', '7860')}"

    # -- "Use via API" --
    def api_segment(
        self, image_b64: str, segment_prompt: list, point_labels: list | None = None, model: str = "", n: int = 1
    ) -> dict:
        """Segment a base64 picture from points [[[x, y], ...], ...]; returns the same JSON as POST /v1/images/segmentations."""
        try:
            result = service.segment(
                self.registry,
                image=decode_base64_image(image_b64),
                points=segment_prompt,
                labels=point_labels,
                model=model or None,
                candidates=int(n),
            )
        except (SegmentationError, APIError) as error:
            raise gr.Error(error.message) from error
        return build_response(result).model_dump()

    # -- helpers --
    def _scale(self, state: dict) -> float:
        height, width = state["rgb"].shape[:2]
        pw, _ = visualize.preview_size(width, height, PREVIEW_SIDE)
        return pw / width

    def _canvas(self, state: dict) -> np.ndarray:
        height, width = state["rgb"].shape[:2]
        pw, ph = visualize.preview_size(width, height, PREVIEW_SIDE)
        preview = visualize.resize_rgb(state["rgb"], pw, ph)
        objects = [(obj["points"], obj["labels"]) for obj in state["objects"]]
        return visualize.draw_points(preview, objects, state["active"], scale=pw / width)

    @staticmethod
    def _by_object(labels: np.ndarray, positions: list[int]) -> np.ndarray:
        """Label values → object numbers, so colours match the points even with an empty object in between."""
        table = np.zeros(len(positions) + 1, dtype=np.int32)
        table[1:] = np.asarray(positions) + 1
        return table[labels]

    @staticmethod
    def _legend_rows(state: dict, chosen, positions: list[int]) -> list[dict]:
        total = chosen.labels.size
        rows = []
        by_position = dict(zip(positions, chosen.objects))
        for index, obj in enumerate(state["objects"]):
            result = by_position.get(index)
            rows.append(
                {
                    "value": index + 1,
                    "name": f"Object {index + 1}",
                    "score": result.score if result else None,
                    "area": result.area if result else None,
                    "percent": 100.0 * result.area / total if result else 0.0,
                    "points": len(obj["points"]),
                    "candidate": f"{result.candidate + 1} of {result.candidates}"
                    if result and result.candidates > 1
                    else None,
                }
            )
        return rows

    @staticmethod
    def _empty_views():
        return (None, None, None, visualize.legend_html([]), [])

    # -- layout --
    def build(self) -> gr.Blocks:
        served = list(self.registry.served)
        with gr.Blocks(title="SAM-HQ point segmentation") as demo:
            state = gr.State(new_state(self.registry.default))
            gr.Markdown(
                "# SAM-HQ point segmentation\n"
                "Upload a picture, then **click** on it: each click segments at once. "
                "*Include* points add to the active object, *exclude* points carve it out; "
                "**New object** starts the next one. The picture is embedded once, so clicks after the first are fast."
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    canvas = gr.Image(
                        label="Picture — click to add points",
                        type="filepath",
                        image_mode=None,  # hand us the upload undecoded: the pixel limit is checked first
                        sources=["upload", "clipboard"],
                        interactive=True,
                        elem_id="canvas",
                        height=520,
                    )
                    with gr.Row():
                        mode = gr.Radio([INCLUDE, EXCLUDE], value=INCLUDE, label="Click mode", elem_id="mode")
                        active = gr.Dropdown(
                            object_names(new_state("")),
                            value="Object 1",
                            label="Active object",
                            elem_id="active-object",
                        )
                    with gr.Row():
                        new_btn = gr.Button("+ New object", elem_id="new-object")
                        undo_btn = gr.Button("↶ Undo point", elem_id="undo")
                        clear_obj_btn = gr.Button("Clear object", elem_id="clear-object")
                        clear_btn = gr.Button("Clear all", variant="stop", elem_id="clear-all")
                    examples = gr.Gallery(
                        [(path, Path(path).stem) for path in example_pictures()],
                        label="Examples — click one (embedded at start-up, so the first click is instant)",
                        columns=4,
                        height=150,
                        allow_preview=False,
                        elem_id="examples",
                    )
                with gr.Column(scale=1):
                    with gr.Tabs():
                        with gr.Tab("Overlay"):
                            overlay = gr.Image(label="Labeled result", interactive=False, elem_id="overlay", height=520)
                        with gr.Tab("Mask"):
                            mask = gr.Image(
                                label="Categorical mask", interactive=False, elem_id="mask-view", height=520
                            )
                        with gr.Tab("Cut-out"):
                            cut = gr.Image(
                                label="Cut-out", interactive=False, image_mode="RGBA", elem_id="cutout", height=520
                            )
                    legend = gr.HTML(visualize.legend_html([]), elem_id="legend")
                    candidates = gr.Gallery(
                        label="Alternatives for a single-point object (click to choose)",
                        columns=3,
                        height=190,
                        allow_preview=False,
                        elem_id="candidates",
                    )
            status = gr.Markdown("Upload a picture or pick an example to start.", elem_id="status")
            with gr.Accordion("Model and advanced settings", open=False):
                model = gr.Dropdown(served, value=self.registry.default, label="Model", elem_id="model")
                hq_only = gr.Checkbox(False, label="HQ token only (SAM-HQ)")
                opacity = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="Overlay opacity")
                gr.Markdown(
                    "Catalog: "
                    + ", ".join(f"`{spec.id}` ({spec.encoder})" for spec in CATALOG.values())
                    + ". Served here: "
                    + ", ".join(f"`{name}`" for name in served)
                )
            with gr.Accordion("Export", open=False):
                export_btn = gr.Button("Prepare downloads", elem_id="export")
                with gr.Row():
                    mask_file = gr.File(label="mask.png (categorical, same bytes as the API)", elem_id="mask-file")
                    objects_file = gr.File(label="objects.json (COCO RLE + polygons)", elem_id="objects-file")
                    response_file = gr.File(label="response.json (API response)", elem_id="response-file")
                snippet = gr.Code(label="Call the API with this prompt", language="python")

            gpu = _spaces_gpu  # handlers that run the model get a GPU on ZeroGPU Spaces
            views = [overlay, mask, cut, legend, candidates]
            rendered = [canvas, *views, active, state, status]
            quiet = {"api_visibility": "private"}
            canvas.upload(gpu(self.load_picture), [canvas, state], [canvas, *views, state, status], **quiet)
            canvas.clear(
                lambda s: (
                    None,
                    *self._empty_views(),
                    clear_all(s) | {"key": None, "rgb": None},
                    "Upload a picture to start.",
                ),
                [state],
                [canvas, *views, state, status],
                **quiet,
            )
            examples.select(gpu(self.load_example), [state], [canvas, *views, state, status], **quiet)
            canvas.select(
                gpu(self.click), [state, mode, hq_only, opacity], rendered, trigger_mode="always_last", **quiet
            )
            candidates.select(gpu(self.choose), [state, hq_only, opacity], rendered, **quiet)
            new_btn.click(self.edit(start_new_object), [state, hq_only, opacity], rendered, **quiet)
            undo_btn.click(self.edit(undo_point), [state, hq_only, opacity], rendered, **quiet)
            clear_obj_btn.click(self.edit(clear_object), [state, hq_only, opacity], rendered, **quiet)
            clear_btn.click(self.edit(clear_all), [state, hq_only, opacity], rendered, **quiet)
            active.input(self.edit(select_object), [state, hq_only, opacity, active], rendered, **quiet)
            hq_only.input(self.edit(lambda s: s), [state, hq_only, opacity], rendered, **quiet)
            opacity.release(self.edit(lambda s: s), [state, hq_only, opacity], rendered, **quiet)
            model.input(gpu(self.change_model), [model, state], [canvas, state, status], **quiet)
            export_btn.click(self.export, [state], [mask_file, objects_file, response_file, snippet], **quiet)
            demo.load(self.startup_status, None, status, **quiet)
            gr.api(gpu(self.api_segment), api_name="segment")
        demo.queue(default_concurrency_limit=2, max_size=self.settings.max_queue)
        return demo

    def startup_status(self) -> str:
        state = self.registry.status(self.registry.default)
        if state.startswith("unavailable"):
            return f"⚠️ The model {self.registry.default} is {state}. The app keeps retrying; see the README for providing weights."
        return "Upload a picture or pick an example to start."


# ---- serving -------------------------------------------------------------------------------------


def preload(registry: ModelRegistry, settings: Settings) -> threading.Thread:
    """Load the default model and embed the example pictures in the background: the server starts at once."""

    def run() -> None:
        try:
            segmenter = registry.get()
        except SegmentationError as error:
            log.error("default model not loaded: %s", error.message)
            return
        if settings.preload_examples:
            for path in example_pictures():
                try:
                    segmenter.embed(path)
                except SegmentationError as error:
                    log.warning("could not embed example %s: %s", path, error.message)
            log.info("example pictures embedded")

    thread = threading.Thread(target=run, name="preload", daemon=True)
    thread.start()
    return thread


def build_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """One FastAPI app: the HTTP API under /v1 and /authentication, the Gradio UI at /."""
    settings = settings or Settings.from_env()
    registry = registry or ModelRegistry(settings)
    app = FastAPI(title="SAM-HQ point segmentation", version="0.1.0")
    install_api(app, registry, settings)
    ui = SegmentationUI(registry, settings)
    demo = ui.build()
    app.state.registry, app.state.ui = registry, ui
    return gr.mount_gradio_app(app, demo, path="/", allowed_paths=[str(ASSETS)], max_file_size="50mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SAM-HQ point segmentation: UI + HTTP API on one port.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public *.gradio.live link")
    parser.add_argument("--model", help="the default model (SAMHQ_MODEL)")
    parser.add_argument("--models", help="comma-separated served models (SAMHQ_MODELS)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (SAMHQ_DEVICE)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16 (SAMHQ_DTYPE)")
    parser.add_argument("--cache-mb", type=int, help="embedding cache bound in MB (SAMHQ_CACHE_MB)")
    parser.add_argument("--no-preload", action="store_true", help="don't embed the example pictures at start-up")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder at load (SAMHQ_COMPILE)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads; 0 = the usable cores (SAMHQ_THREADS)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    changes: dict[str, Any] = {}
    if args.model:
        changes["model"] = args.model
    if args.models:
        changes["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.device:
        changes["device"] = args.device
    if args.dtype:
        changes["dtype"] = args.dtype
    if args.cache_mb is not None:
        changes["cache_mb"] = args.cache_mb
    if args.no_preload:
        changes["preload_examples"] = False
    if args.compile:
        changes["compile"] = True
    if args.threads is not None:
        changes["threads"] = args.threads
    settings = dataclasses.replace(settings, **changes)
    if settings.models and settings.model not in settings.models:
        settings = dataclasses.replace(settings, models=(settings.model, *settings.models))
    return settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = settings_from(args)
    fit_cpu_threads(settings.threads)
    registry = ModelRegistry(settings)
    app = build_app(settings, registry)
    preload(registry, settings)
    if args.share:
        # gr.Blocks.launch(share=True) would serve its own app without our API routes; instead the
        # tunnel Gradio uses for share links points at this server, UI and API together.
        threading.Thread(target=_open_share_link, args=(args.host, args.port), daemon=True).start()
    log.info("serving UI and API on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _open_share_link(host: str, port: int) -> None:
    import secrets

    from gradio import networking

    time.sleep(2)  # let uvicorn bind first
    try:
        url = networking.setup_tunnel(
            "127.0.0.1" if host == "0.0.0.0" else host, port, secrets.token_urlsafe(32), None, None
        )
        log.info("public share link: %s (UI and API)", url)
    except Exception as error:  # no network, blocked, ...
        log.error("could not create a share link: %s", error)


if __name__ == "__main__":
    main()
