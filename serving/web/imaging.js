// Pixel arithmetic shared by the on-device page and its tests: no DOM, no network, runs in Node too.
//
// Every function here reimplements one step of the server's preprocessing bit for bit:
// - resizeUint8: Pillow's Image.resize(..., BILINEAR) on an "L" image (scoring.imaging.resize_to), i.e.
//   libImaging/Resample.c: a separable triangle filter whose support grows with the shrink factor
//   (antialiased), coefficients normalised then rounded to 22-bit fixed point, horizontal pass first.
// - resizeFloat32: the same filter on an "F" image (serving.overlay.heatmap), in double precision.
// - rgbaToGrey: Pillow's RGB -> L conversion (ITU-R 601-2 luma, 16-bit fixed point, rounded).
// - stretchToUint8: scoring.pixels.stretch_to_uint8 (min..max to 0..255, NumPy's round half to even).
// - implausibility: scoring.checks.implausibility, with the same messages.
// - heatmap / overlay: serving.overlay.

export class ImageDecodeError extends Error {
  constructor(message) {
    super(message);
    this.name = "ImageDecodeError";
  }
}

const PRECISION_BITS = 32 - 8 - 2;

/** NumPy's np.round and Python's round(): halves go to the even neighbour. */
export function roundHalfEven(value) {
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (fraction > 0.5) return floor + 1;
  if (fraction < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

const BILINEAR = {
  support: 1.0,
  filter(x) {
    const distance = x < 0 ? -x : x;
    return distance < 1 ? 1 - distance : 0;
  },
};

const BICUBIC = {
  support: 2.0,
  filter(x) {
    const a = -0.5;
    const d = x < 0 ? -x : x;
    if (d < 1.0) return ((a + 2.0) * d - (a + 3.0)) * d * d + 1;
    if (d < 2.0) return (((d - 5) * d + 8) * d - 4) * a;
    return 0.0;
  },
};

/** Resample.c precompute_coeffs over the whole input (box = 0..inSize). */
function precomputeCoeffs(inSize, outSize, kernel = BILINEAR) {
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = kernel.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Float64Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const base = xx * ksize;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = kernel.filter((x + xmin - center + 0.5) * ss);
      kk[base + x] = w;
      ww += w;
    }
    if (ww !== 0.0) {
      for (let x = 0; x < xmax; x++) kk[base + x] /= ww;
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, kk, bounds };
}

/** Resample.c normalize_coeffs_8bpc: doubles to 22-bit fixed point, rounded away from zero. */
function fixedPoint(kk) {
  const fixed = new Int32Array(kk.length);
  const one = 1 << PRECISION_BITS;
  for (let i = 0; i < kk.length; i++) {
    fixed[i] = kk[i] < 0 ? Math.trunc(-0.5 + kk[i] * one) : Math.trunc(0.5 + kk[i] * one);
  }
  return fixed;
}

function clip8(sum) {
  const value = sum >> PRECISION_BITS;
  return value < 0 ? 0 : value > 255 ? 255 : value;
}

function resample(src, width, height, outWidth, outHeight, float, kernel = BILINEAR) {
  const needHorizontal = outWidth !== width;
  const needVertical = outHeight !== height;
  if (!needHorizontal && !needVertical) return float ? Float32Array.from(src) : Uint8Array.from(src);
  const Out = float ? Float32Array : Uint8Array;
  const vertical = precomputeCoeffs(height, outHeight, kernel);
  const yFirst = vertical.bounds[0];
  const yLast = vertical.bounds[outHeight * 2 - 2] + vertical.bounds[outHeight * 2 - 1];
  let image = src;
  let imageWidth = width;
  if (needHorizontal) {
    const horizontal = precomputeCoeffs(width, outWidth, kernel);
    for (let i = 0; i < outHeight; i++) vertical.bounds[i * 2] -= yFirst;
    const rows = yLast - yFirst;
    const temp = new Out(outWidth * rows);
    const { ksize, bounds } = horizontal;
    const k = float ? horizontal.kk : fixedPoint(horizontal.kk);
    const start = float ? 0.0 : 1 << (PRECISION_BITS - 1);
    for (let yy = 0; yy < rows; yy++) {
      const row = (yy + yFirst) * width;
      for (let xx = 0; xx < outWidth; xx++) {
        const xmin = bounds[xx * 2];
        const xmax = bounds[xx * 2 + 1];
        const base = xx * ksize;
        let sum = start;
        for (let x = 0; x < xmax; x++) sum += src[row + x + xmin] * k[base + x];
        temp[yy * outWidth + xx] = float ? sum : clip8(sum);
      }
    }
    image = temp;
    imageWidth = outWidth;
  }
  if (!needVertical) return image;
  const out = new Out(imageWidth * outHeight);
  const { ksize, bounds } = vertical;
  const k = float ? vertical.kk : fixedPoint(vertical.kk);
  const start = float ? 0.0 : 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[yy * 2];
    const ymax = bounds[yy * 2 + 1];
    const base = yy * ksize;
    for (let xx = 0; xx < imageWidth; xx++) {
      let sum = start;
      for (let y = 0; y < ymax; y++) sum += image[(y + ymin) * imageWidth + xx] * k[base + y];
      out[yy * imageWidth + xx] = float ? sum : clip8(sum);
    }
  }
  return out;
}

/** PIL Image.fromarray(uint8 2-D).resize((outWidth, outHeight), BILINEAR), row-major Uint8Array. */
export function resizeUint8(src, width, height, outWidth, outHeight) {
  return resample(src, width, height, outWidth, outHeight, false);
}

/** PIL Image.fromarray(float32 2-D).resize((outWidth, outHeight), BILINEAR), row-major Float32Array. */
export function resizeFloat32(src, width, height, outWidth, outHeight) {
  return resample(src, width, height, outWidth, outHeight, true);
}

/** Pillow's RGB -> L (Convert.c rgb2l): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; alpha ignored. */
export function rgbaToGrey(rgba) {
  const grey = new Uint8Array(rgba.length / 4);
  for (let i = 0, j = 0; i < grey.length; i++, j += 4) {
    grey[i] = (rgba[j] * 19595 + rgba[j + 1] * 38470 + rgba[j + 2] * 7471 + 0x8000) >>> 16;
  }
  return grey;
}

/** scoring.pixels.stretch_to_uint8: a float array mapped linearly onto 0..255 by its own min and max. */
export function stretchToUint8(values) {
  let low = Infinity;
  let high = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) throw new ImageDecodeError("image holds non-finite pixel values");
    if (v < low) low = v;
    if (v > high) high = v;
  }
  const out = new Uint8Array(values.length);
  if (!(high > low)) return out;
  const factor = 255.0 / (high - low);
  for (let i = 0; i < values.length; i++) out[i] = roundHalfEven((values[i] - low) * factor);
  return out;
}

export function standardDeviation(grey) {
  let sum = 0;
  for (let i = 0; i < grey.length; i++) sum += grey[i];
  const mean = sum / grey.length;
  let squares = 0;
  for (let i = 0; i < grey.length; i++) {
    const d = grey[i] - mean;
    squares += d * d;
  }
  return Math.sqrt(squares / grey.length);
}

/** The mean over pixels of max - min of R, G, B (scoring.checks.colour_spread's statistic). */
export function colourSpread(rgba) {
  const count = rgba.length / 4;
  let sum = 0;
  for (let j = 0; j < rgba.length; j += 4) {
    const r = rgba[j], g = rgba[j + 1], b = rgba[j + 2];
    sum += Math.max(r, g, b) - Math.min(r, g, b);
  }
  return count ? sum / count : 0;
}

/** PIL's Image.thumbnail size: fit in `limit` x `limit`, keeping the aspect (None when already small). */
export function thumbnailSize(width, height, limit) {
  if (limit >= width && limit >= height) return null;
  const aspect = width / height;
  const roundAspect = (number, key) => {
    const candidates = [Math.floor(number), Math.ceil(number)];
    const best = key(candidates[0]) <= key(candidates[1]) ? candidates[0] : candidates[1];
    return Math.max(best, 1);
  };
  let x = limit;
  let y = limit;
  if (x / y >= aspect) {
    x = roundAspect(y * aspect, (n) => Math.abs(aspect - n / y));
  } else {
    y = roundAspect(x / aspect, (n) => (n === 0 ? 0 : Math.abs(aspect - x / n)));
  }
  return [x, y];
}

/** The colour statistic on a small thumbnail, as the server computes it: Pillow's bicubic filter, channel
 * by channel. (The server first shrinks a JPEG in its decoder (draft) and a large image by whole factors
 * (reducing_gap): there the two agree to a few units of 255, not exactly.) */
export function thumbnailColourSpread(rgba, width, height, limit) {
  const size = thumbnailSize(width, height, limit);
  if (size === null) return colourSpread(rgba);
  const [tw, th] = size;
  const channels = [0, 1, 2].map((c) => {
    const plane = new Uint8Array(width * height);
    for (let i = 0; i < plane.length; i++) plane[i] = rgba[i * 4 + c];
    return resample(plane, width, height, tw, th, false, BICUBIC);
  });
  const small = new Uint8Array(tw * th * 4);
  for (let i = 0; i < tw * th; i++) {
    small[i * 4] = channels[0][i];
    small[i * 4 + 1] = channels[1][i];
    small[i * 4 + 2] = channels[2][i];
  }
  return colourSpread(small);
}

/** Python's format(value, ".{precision}g"), for the numbers in messages. */
export function formatG(value, precision) {
  if (value === 0) return "0";
  if (!Number.isFinite(value)) return String(value).toLowerCase().replace("infinity", "inf");
  const [mantissa, exponentText] = value.toExponential(precision - 1).split("e");
  const exponent = Number(exponentText);
  const strip = (text) => (text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text);
  if (exponent >= -4 && exponent < precision) return strip(value.toFixed(Math.max(0, precision - 1 - exponent)));
  const sign = exponent < 0 ? "-" : "+";
  return `${strip(mantissa)}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
}

/** scoring.checks.implausibility: why a decoded image is implausible as a chest X-ray, or null. */
export function implausibility(grey, width, height, spread, checks) {
  if (Math.max(height, width) > checks.max_aspect * Math.min(height, width)) {
    return `not scored: ${width} x ${height} pixels is too elongated for a chest X-ray`;
  }
  if (standardDeviation(grey) < checks.min_pixel_std) return "not scored: the image is almost uniform";
  if (spread !== null && spread > checks.colour_spread_limit) {
    return `not scored: strongly coloured (channel spread ${roundHalfEven(spread)} of 255); X-rays are greyscale`;
  }
  return null;
}

/** serving.overlay.heatmap: a Float32Array (height x width) in [0, 1]. */
export function heatmap(cam, camHeight, camWidth, height, width, towardsPneumonia, crop) {
  const sign = towardsPneumonia ? 1.0 : -1.0;
  const evidence = new Float32Array(cam.length);
  let peak = 0;
  for (let i = 0; i < cam.length; i++) {
    evidence[i] = Math.max(cam[i] * sign, 0.0);
    if (evidence[i] > peak) peak = evidence[i];
  }
  if (peak > 0) for (let i = 0; i < evidence.length; i++) evidence[i] = evidence[i] / peak;
  const innerHeight = Math.max(1, roundHalfEven(height * crop));
  const innerWidth = Math.max(1, roundHalfEven(width * crop));
  const inner = resizeFloat32(evidence, camWidth, camHeight, innerWidth, innerHeight);
  let innerPeak = 0;
  for (let i = 0; i < inner.length; i++) {
    inner[i] = Math.min(Math.max(inner[i], 0.0), 1.0);
    if (inner[i] > innerPeak) innerPeak = inner[i];
  }
  if (innerPeak > 0) for (let i = 0; i < inner.length; i++) inner[i] = inner[i] / innerPeak;
  const heat = new Float32Array(height * width);
  const top = Math.floor((height - innerHeight) / 2);
  const left = Math.floor((width - innerWidth) / 2);
  for (let y = 0; y < innerHeight; y++) {
    heat.set(inner.subarray(y * innerWidth, (y + 1) * innerWidth), (top + y) * width + left);
  }
  return heat;
}

/** serving.overlay.overlay: RGBA bytes of the X-ray with the jet colours blended in by alpha x heat
 * (PIL's Image.composite arithmetic: DIV255(base * (255 - w) + colour * w)). */
export function overlay(grey, heat, palette, alpha) {
  const rgba = new Uint8ClampedArray(grey.length * 4);
  for (let i = 0; i < grey.length; i++) {
    const h = Math.min(Math.max(heat[i], 0.0), 1.0);
    const level = roundHalfEven(Math.fround(h * 255.0));
    const weight = roundHalfEven(level * alpha);
    for (let c = 0; c < 3; c++) {
      const blended = grey[i] * (255 - weight) + palette[level * 3 + c] * weight + 128;
      rgba[i * 4 + c] = ((blended >> 8) + blended) >> 8;
    }
    rgba[i * 4 + 3] = 255;
  }
  return rgba;
}
