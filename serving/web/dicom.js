// DICOM Part 10 bytes -> 8-bit greyscale, as scoring/dicom.py does it with pydicom:
// modality rescale (slope, intercept), then the VOI window (LINEAR, LINEAR_EXACT or SIGMOID, first
// window), then min..max stretch to 0..255, then MONOCHROME1 inverted. Uncompressed transfer syntaxes
// only (implicit or explicit VR, little or big endian); MONOCHROME1, MONOCHROME2 and RGB.
// Parsing is dicom-parser's (passed in: a global in the page, a CommonJS module in Node).
// Patient fields are never read.

import { ImageDecodeError, stretchToUint8 } from "./imaging.js";

const DEFLATED = "1.2.840.10008.1.2.1.99";
const UNCOMPRESSED = new Set(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]);
const BIG_ENDIAN = "1.2.840.10008.1.2.2";
// pydicom's names for the compressed transfer syntaxes, so a refusal names the compression the same way.
const COMPRESSED_NAMES = {
  "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
  "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
  "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
  "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
  "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless Image Compression",
  "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless) Image Compression",
  "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
  "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
  "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
  "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)",
  "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 Image Compression",
  "1.2.840.10008.1.2.5": "RLE Lossless",
};
const ON_THE_SERVER = "use the “On the server” page, or export it uncompressed or as PNG";

function describe(error) {
  if (typeof error === "string") return error;
  if (error && typeof error.exception === "string") return error.exception;
  return (error && error.message) || String(error);
}

function text(dataSet, tag) {
  const value = dataSet.string(tag);
  return value === undefined ? undefined : value.replace(/[\0 ]+$/, "").trim();
}

function decimal(dataSet, tag, index = 0) {
  const element = dataSet.elements[tag];
  if (!element || element.length === 0) return undefined;
  const value = dataSet.floatString(tag, index);
  return Number.isFinite(value) ? value : undefined;
}

function unsigned(dataSet, tag, fallback) {
  const element = dataSet.elements[tag];
  if (!element || element.length < 2) return fallback;
  return dataSet.uint16(tag);
}

/** The stored pixel values as pydicom's pixel_array gives them: masked to BitsStored, sign-extended. */
function storedValues(dataSet, element, count, bitsAllocated, bitsStored, signed, bigEndian) {
  const bytesPer = bitsAllocated / 8;
  const needed = count * bytesPer;
  if (element.length < needed) {
    throw new ImageDecodeError(
      `DICOM pixel data is unreadable: it holds ${element.length} bytes where ${needed} are expected`);
  }
  const view = new DataView(dataSet.byteArray.buffer, dataSet.byteArray.byteOffset + element.dataOffset, needed);
  const values = new Float64Array(count);
  const signBit = 2 ** (bitsStored - 1);
  const span = 2 ** bitsStored;
  for (let i = 0; i < count; i++) {
    let raw;
    if (bytesPer === 1) raw = view.getUint8(i);
    else if (bytesPer === 2) raw = view.getUint16(i * 2, !bigEndian);
    else raw = view.getUint32(i * 4, !bigEndian);
    let value = bitsStored >= 32 ? raw : raw % span;  // the bits above BitsStored dropped
    if (signed && value >= signBit) value -= span;
    values[i] = value;
  }
  return values;
}

/** pydicom.pixels.apply_windowing, first window only. */
function applyWindow(values, dataSet, bitsStored, signed, rescale) {
  const center0 = decimal(dataSet, "x00281050");
  const width0 = decimal(dataSet, "x00281051");
  if (center0 === undefined || width0 === undefined) return values;
  const fn = (text(dataSet, "x00281056") || "LINEAR").toUpperCase();
  let yMin = signed ? -(2 ** (bitsStored - 1)) : 0;
  let yMax = signed ? 2 ** (bitsStored - 1) - 1 : 2 ** bitsStored - 1;
  if (rescale) {
    yMin = yMin * rescale.slope + rescale.intercept;
    yMax = yMax * rescale.slope + rescale.intercept;
  }
  const yRange = yMax - yMin;
  let center = center0;
  let width = width0;
  const out = new Float64Array(values.length);
  if (fn === "LINEAR" || fn === "LINEAR_EXACT") {
    if (fn === "LINEAR") {
      if (width < 1) {
        throw new ImageDecodeError("corrupt DICOM file: The (0028,1051) Window Width must be greater than or " +
          "equal to 1 for a 'LINEAR' windowing operation");
      }
      center -= 0.5;
      width -= 1;
    } else if (width <= 0) {
      throw new ImageDecodeError("corrupt DICOM file: The (0028,1051) Window Width must be greater than 0 " +
        "for a 'LINEAR_EXACT' windowing operation");
    }
    const low = center - width / 2;
    const high = center + width / 2;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v <= low) out[i] = yMin;
      else if (v > high) out[i] = yMax;
      else out[i] = ((v - center) / width + 0.5) * yRange + yMin;
    }
  } else if (fn === "SIGMOID") {
    if (width <= 0) {
      throw new ImageDecodeError("corrupt DICOM file: The (0028,1051) Window Width must be greater than 0 " +
        "for a 'SIGMOID' windowing operation");
    }
    for (let i = 0; i < values.length; i++) out[i] = yRange / (1 + Math.exp(-4 * (values[i] - center) / width)) + yMin;
  } else {
    throw new ImageDecodeError(`corrupt DICOM file: Unsupported (0028,1056) VOI LUT Function value '${fn}'`);
  }
  return out;
}

/**
 * Decode DICOM bytes (a Uint8Array with "DICM" at offset 128) to {grey, width, height}.
 * `limits.max_pixels` bounds the image before any pixel is read. Throws ImageDecodeError.
 */
export function decodeDicom(bytes, dicomParser, limits) {
  let syntax;
  try {
    const meta = dicomParser.readPart10Header(bytes);
    syntax = text(meta, "x00020010") || "";
  } catch (error) {
    throw new ImageDecodeError(`corrupt DICOM file: ${describe(error)}`);
  }
  if (syntax === DEFLATED) {
    // Never inflated here either: a few kB could claim gigabytes.
    throw new ImageDecodeError(
      "DICOM with a deflate-compressed dataset cannot be decoded here: export it uncompressed or as PNG");
  }
  let dataSet;
  try {
    dataSet = dicomParser.parseDicom(bytes);
  } catch (error) {
    throw new ImageDecodeError(`corrupt DICOM file: ${describe(error)}`);
  }
  const pixelData = dataSet.elements.x7fe00010;
  if (!pixelData) throw new ImageDecodeError("DICOM file holds no image (no pixel data)");
  const rows = unsigned(dataSet, "x00280010", 0);
  const columns = unsigned(dataSet, "x00280011", 0);
  if (rows * columns > limits.max_pixels) {
    throw new ImageDecodeError(`DICOM image is ${columns} x ${rows} pixels, over the size limit`);
  }
  const frames = dataSet.intString("x00280008") || 1;
  if (frames > 1) throw new ImageDecodeError(`DICOM with ${frames} frames: upload a single still image`);
  if (!UNCOMPRESSED.has(syntax) || pixelData.encapsulatedPixelData) {
    const name = COMPRESSED_NAMES[syntax] || syntax || "an unknown transfer syntax";
    throw new ImageDecodeError(`DICOM compressed as '${name}' is not decoded on this device: ${ON_THE_SERVER}`);
  }
  const photometric = (text(dataSet, "x00280004") || "MONOCHROME2").toUpperCase();
  const samples = unsigned(dataSet, "x00280002", 1);
  const bitsAllocated = unsigned(dataSet, "x00280100", 0);
  const bitsStored = unsigned(dataSet, "x00280101", bitsAllocated);
  const signed = unsigned(dataSet, "x00280103", 0) === 1;
  if (![8, 16, 32].includes(bitsAllocated) || bitsStored < 1 || bitsStored > bitsAllocated) {
    throw new ImageDecodeError(
      `DICOM with ${bitsAllocated} bits allocated, ${bitsStored} stored is not decoded on this device: ${ON_THE_SERVER}`);
  }
  if (rows < 1 || columns < 1) throw new ImageDecodeError(`DICOM pixel data is unreadable: ${columns} x ${rows} pixels`);
  const supported = (photometric === "RGB" && samples === 3) ||
    ((photometric === "MONOCHROME1" || photometric === "MONOCHROME2") && samples === 1);
  if (!supported) {
    throw new ImageDecodeError(`DICOM with photometric interpretation ${photometric} and ${samples} sample(s) ` +
      `per pixel is not decoded on this device: ${ON_THE_SERVER}`);
  }
  if (dataSet.elements.x00283000 || dataSet.elements.x00283010) {
    throw new ImageDecodeError(`DICOM with a modality or VOI lookup table is not decoded on this device: ${ON_THE_SERVER}`);
  }
  const count = rows * columns;
  const stored = storedValues(dataSet, pixelData, count * samples, bitsAllocated, bitsStored, signed,
    syntax === BIG_ENDIAN);
  let values;
  if (samples === 3) {
    // pydicom gives (rows, columns, 3); the server takes the mean over the channels.
    const planar = unsigned(dataSet, "x00280006", 0) === 1;
    values = new Float64Array(count);
    for (let i = 0; i < count; i++) {
      const [r, g, b] = planar ? [stored[i], stored[count + i], stored[2 * count + i]]
        : [stored[3 * i], stored[3 * i + 1], stored[3 * i + 2]];
      values[i] = (r + g + b) / 3;
    }
  } else {
    const slope = decimal(dataSet, "x00281053");
    const intercept = decimal(dataSet, "x00281052");
    const rescale = slope !== undefined && intercept !== undefined ? { slope, intercept } : null;
    values = stored;
    if (rescale) {
      values = new Float64Array(count);
      for (let i = 0; i < count; i++) values[i] = stored[i] * rescale.slope + rescale.intercept;
    }
    values = applyWindow(values, dataSet, bitsStored, signed, rescale);
  }
  const grey = stretchToUint8(values);
  if (photometric === "MONOCHROME1") for (let i = 0; i < grey.length; i++) grey[i] = 255 - grey[i];
  return { grey, width: columns, height: rows };
}
