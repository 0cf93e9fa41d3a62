// The hover preview's worker (a module worker, so the page's thread never waits for an inference): it holds
// onnxruntime-web's sessions of the browser graphs (segmentation/onnx_graph.py: the picture graph, run once per
// picture for the first two-way layer's projections and the positional grid, and the decoder graph, run per
// hover) and the current picture's features, and answers each "run" with the mask as RGBA at the page's preview
// size, upscaled as the server upscales (segmentation/decoder.py upscale_logits: bilinear 256 → 1024, crop to
// the resized size, bilinear to the size).
let ort = null;
let session = null;
let pictureSession = null;
let decoderUrl = null;
let picture = null; // { key, tokens, hq, projected: {keys, values, queries, positions}, original: [h, w], resized: [h, w] }

const HALF = (() => {
  // every float16 bit pattern as a float32: one table lookup per value
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) table[h] = sign * 2 ** -14 * (fraction / 1024);
    else if (exponent === 31) table[h] = fraction ? NaN : sign * Infinity;
    else table[h] = sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }
  return table;
})();

async function init(message) {
  if (!ort) {
    ort = await import(message.runtime + "ort.wasm.min.mjs");
    ort.env.wasm.wasmPaths = message.runtime;
    // threads need SharedArrayBuffer, i.e. a cross-origin isolated page (SAMHQ_UI_ISOLATE=1); else one thread
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(message.threads || 1, navigator.hardwareConcurrency || 1)) : 1;
  }
  if (decoderUrl === message.decoder && session) return { bytes: 0, ms: 0 };
  const start = performance.now();
  session = null; pictureSession = null; decoderUrl = null; picture = null; // a new model: its own projections
  const load = async (url) => {
    const response = await fetch(url);
    if (!response.ok) throw new Error("The preview's decoder could not be fetched (" + response.status + ").");
    const graph = new Uint8Array(await response.arrayBuffer());
    const made = await ort.InferenceSession.create(graph, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    return { made, bytes: graph.byteLength };
  };
  const [decoder, pictureGraph] = await Promise.all([load(message.decoder), load(message.picture)]);
  session = decoder.made;
  pictureSession = pictureGraph.made;
  decoderUrl = message.decoder;
  return {
    bytes: decoder.bytes + pictureGraph.bytes, pictureGraphBytes: pictureGraph.bytes,
    ms: performance.now() - start, threads: ort.env.wasm.numThreads,
  };
}

async function features(message) {
  if (picture && picture.key === message.key) return { bytes: 0, ms: 0 };
  const start = performance.now();
  picture = null;
  const response = await fetch(message.url);
  if (!response.ok) throw new Error("The picture's features could not be fetched (" + response.status + ").");
  const data = new Uint8Array(await response.arrayBuffer());
  const magic = new TextDecoder().decode(data.subarray(0, 8));
  if (magic !== "SAMHQF1\n") throw new Error("The picture's features are not in the expected format.");
  const length = new DataView(data.buffer).getUint32(8, true);
  const header = JSON.parse(new TextDecoder().decode(data.subarray(12, 12 + length)));
  const body = 12 + length;
  const arrays = {};
  for (const item of header.arrays) {
    const count = item.bytes / 2;
    const low = data.subarray(body + item.offset, body + item.offset + count);
    const high = data.subarray(body + item.offset + count, body + item.offset + item.bytes);
    const values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = HALF[low[i] | (high[i] << 8)];
    arrays[item.name] = new ort.Tensor("float32", values, item.shape);
  }
  // the first layer's picture-only projections, once per picture (as the server caches them), not per hover
  const projecting = performance.now();
  const projected = await pictureSession.run({ tokens: arrays.tokens });
  picture = {
    key: message.key, tokens: arrays.tokens, hq: arrays.hq_features, projected,
    original: header.original_size, resized: header.resized_size,
  };
  const end = performance.now();
  return { bytes: data.byteLength, ms: end - start, pictureMs: end - projecting, resized: header.resized_size };
}

// Bilinear resize of rows × cols `source` (row-major) to outRows × outCols, align_corners=False as torch's
// F.interpolate, reading only the top-left `useRows` × `useCols` of the source grid upscaled by `scale`
// when `scale` > 0 (the crop), else the whole source.
function axis(outSize, inSize) {
  const index0 = new Int32Array(outSize), index1 = new Int32Array(outSize), weight = new Float32Array(outSize);
  const ratio = inSize / outSize;
  for (let o = 0; o < outSize; o++) {
    const s = Math.max(0, (o + 0.5) * ratio - 0.5);
    const i0 = Math.min(Math.floor(s), inSize - 1);
    index0[o] = i0; index1[o] = Math.min(i0 + 1, inSize - 1); weight[o] = s - i0;
  }
  return { index0, index1, weight };
}

function resize(source, rows, cols, outRows, outCols, rowAxis, colAxis) {
  // rows first (on every source column), then columns
  const tmp = new Float32Array(outRows * cols);
  for (let r = 0; r < outRows; r++) {
    const a = rowAxis.index0[r] * cols, b = rowAxis.index1[r] * cols, w = rowAxis.weight[r], o = r * cols;
    for (let c = 0; c < cols; c++) tmp[o + c] = source[a + c] * (1 - w) + source[b + c] * w;
  }
  const out = new Float32Array(outRows * outCols);
  for (let r = 0; r < outRows; r++) {
    const o = r * outCols, t = r * cols;
    for (let c = 0; c < outCols; c++) {
      const w = colAxis.weight[c];
      out[o + c] = tmp[t + colAxis.index0[c]] * (1 - w) + tmp[t + colAxis.index1[c]] * w;
    }
  }
  return out;
}

function upscale(logits, side, resized, size) {
  // side×side → 4·side square (the 1024 frame), of which only the resized rows/cols are kept, → size
  const frame = side * 4;
  const [rh, rw] = resized, [h, w] = size;
  const big = resize(logits, side, side, rh, rw, sliced(axis(frame, side), rh), sliced(axis(frame, side), rw));
  return resize(big, rh, rw, h, w, axis(h, rh), axis(w, rw));
}

function sliced(full, n) {
  return { index0: full.index0.subarray(0, n), index1: full.index1.subarray(0, n), weight: full.weight.subarray(0, n) };
}

async function run(message) {
  if (!session || !picture || picture.key !== message.key) throw new Error("not ready");
  const start = performance.now();
  const count = message.labels.length;
  const feeds = {
    tokens: picture.tokens,
    ...picture.projected,
    point_coords: new ort.Tensor("float32", Float32Array.from(message.coords), [1, count, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(message.labels), [1, count]),
  };
  if (session.inputNames.includes("hq_features")) feeds.hq_features = picture.hq;
  const output = await session.run(feeds);
  const ran = performance.now();
  const logits = output.low_res_logits;
  const side = logits.dims[3];
  const [h, w] = message.size;
  const values = upscale(logits.data, side, picture.resized, [h, w]);
  const mask = new Uint8Array(h * w);
  const rgba = new Uint8ClampedArray(h * w * 4);
  const [r, g, b] = message.color;
  const alpha = message.alpha;
  let area = 0;
  for (let i = 0; i < mask.length; i++) {
    if (values[i] > 0) {
      mask[i] = 1; area++;
      const p = i * 4;
      rgba[p] = r; rgba[p + 1] = g; rgba[p + 2] = b; rgba[p + 3] = alpha;
    }
  }
  return {
    mask, rgba, area, score: output.score.data[0],
    ms: { run: ran - start, upscale: performance.now() - ran },
  };
}

self.onmessage = async (event) => {
  const message = event.data;
  try {
    if (message.type === "init") self.postMessage({ type: "init", id: message.id, ...(await init(message)) });
    else if (message.type === "features") self.postMessage({ type: "features", id: message.id, ...(await features(message)) });
    else if (message.type === "run") {
      const result = await run(message);
      self.postMessage({ type: "run", id: message.id, ...result }, [result.mask.buffer, result.rgba.buffer]);
    }
  } catch (error) {
    self.postMessage({ type: "error", id: message.id, of: message.type, message: String(error && error.message || error) });
  }
};
