// File bytes -> 8-bit greyscale, in the page, as scoring.imaging.decode_greyscale does on the server.
//
// - DICOM (bytes "DICM" at offset 128, checked first, as on the server): dicom.js.
// - PNG and JPEG: the browser's own decoders (createImageBitmap, EXIF orientation applied, no colour
//   management), transparent areas composed on black, then Pillow's RGB -> L. An 8- or 16-bit greyscale
//   PNG is decoded here instead: the browser would round 16 bits to 8 before the min..max stretch Pillow's
//   "I;16" path makes, and would make a tRNS grey level black where the server ignores it.
// - Before any pixel is decoded, the headers are read for the checks the server makes first: the size
//   limits, several frames (APNG), a truncated stream, and PNG text chunks that inflate past Pillow's limit.
// - TIFF, BMP, GIF and WebP, which the server also accepts, are refused here with a pointer to the server.
//
// Everything except `decodeWithBrowser` runs in Node as well (the tests use that).

import { ImageDecodeError, formatG, rgbaToGrey, stretchToUint8, thumbnailColourSpread } from "./imaging.js";
import { decodeDicom } from "./dicom.js";

export const DICOM_MAGIC_OFFSET = 128;
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
// Pillow's limit on one decompressed text chunk (PngImagePlugin.MAX_TEXT_CHUNK = ImageFile.SAFEBLOCK).
const MAX_TEXT_CHUNK = 1024 * 1024;
const SERVER_ONLY = { TIFF: "TIFF", BMP: "BMP", GIF: "GIF", WEBP: "WebP" };

function startsWith(bytes, prefix, offset = 0) {
  if (bytes.length < offset + prefix.length) return false;
  for (let i = 0; i < prefix.length; i++) if (bytes[offset + i] !== prefix[i]) return false;
  return true;
}

const ascii = (text) => Array.from(text, (c) => c.charCodeAt(0));

/** Which decoder a file goes to, from its first bytes (never its name): the server's order. */
export function sniff(bytes) {
  if (startsWith(bytes, ascii("DICM"), DICOM_MAGIC_OFFSET)) return "DICOM";
  if (startsWith(bytes, PNG_SIGNATURE)) return "PNG";
  if (startsWith(bytes, [0xff, 0xd8, 0xff])) return "JPEG";
  if (startsWith(bytes, ascii("II*\0")) || startsWith(bytes, ascii("MM\0*")) ||
      startsWith(bytes, ascii("II+\0")) || startsWith(bytes, ascii("MM\0+"))) return "TIFF";
  if (startsWith(bytes, ascii("BM"))) return "BMP";
  if (startsWith(bytes, ascii("GIF87a")) || startsWith(bytes, ascii("GIF89a"))) return "GIF";
  if (startsWith(bytes, ascii("RIFF")) && startsWith(bytes, ascii("WEBP"), 8)) return "WEBP";
  return null;
}

const thousands = (n) => n.toLocaleString("en-US");

/** scoring.wording.megabytes: a size as every message gives it (MB, 10^6 bytes; under a kB in bytes). */
const megabytes = (count) => (count < 1000 ? `${thousands(count)} bytes` : `${formatG(count / 1e6, 3)} MB`);

/** scoring.imaging._check_size, in the words of scoring.wording.too_large. */
export function checkSize(size, maxBytes) {
  if (size === 0) throw new ImageDecodeError("empty file (0 bytes)");
  if (size > maxBytes) {
    let actual = megabytes(size);
    let limit = megabytes(maxBytes);
    if (actual === limit) {
      actual = `${thousands(size)} bytes`;
      limit = `${thousands(maxBytes)}-byte`;
    }
    throw new ImageDecodeError(`file is ${actual}, over the ${limit} limit`);
  }
}

/** scoring.imaging._check_dimensions; with `opening`, first Pillow's own refusal of a huge header. */
export function checkDimensions(width, height, limits, opening = false) {
  if (opening && limits.bomb_pixels && width * height > limits.bomb_pixels) {
    throw new ImageDecodeError(`image dimensions are over the ${Math.round(limits.max_pixels / 1e6)} megapixel limit`);
  }
  if (width * height > limits.max_pixels) {
    throw new ImageDecodeError(`image is ${width} x ${height} pixels, over the ` +
      `${Math.round(limits.max_pixels / 1e6)} megapixel limit`);
  }
  if (Math.min(width, height) < limits.min_side) {
    throw new ImageDecodeError(`image is ${width} x ${height} pixels, too small to be an X-ray`);
  }
}

const truncated = () => new ImageDecodeError("corrupt or truncated image: image file is truncated");
const u32 = (b, o) => ((b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]) >>> 0;

/** Inflate a zlib stream with the platform's DecompressionStream, refusing output past `limit` bytes. */
export async function inflate(data, limit) {
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate"));
  const reader = stream.getReader();
  const parts = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > limit) {
        await reader.cancel();
        return null;
      }
      parts.push(value);
    }
  } catch (error) {
    // A stream cut short still yields what it had; anything else is corrupt.
    if (parts.length === 0) throw new ImageDecodeError(`corrupt or truncated image: ${error.message || error}`);
  }
  const out = new Uint8Array(total);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** The PNG's chunks up to IEND (none read past it), checked as Pillow checks them while opening. */
export async function readPng(bytes) {
  let offset = 8;
  let header = null;
  let frames = 1;
  let orientation = 1;
  const idat = [];
  let ended = false;
  while (offset + 8 <= bytes.length) {
    const length = u32(bytes, offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const body = offset + 8;
    if (body + length + 4 > bytes.length) break;  // cut short: no CRC, or no room for the body
    const data = bytes.subarray(body, body + length);
    if (type === "IHDR" && length >= 13) {
      header = { width: u32(data, 0), height: u32(data, 4), bitDepth: data[8], colourType: data[9], interlace: data[12] };
    } else if (type === "acTL" && length >= 8) {
      frames = u32(data, 0);
    } else if (type === "IDAT") {
      idat.push(data);
    } else if (type === "eXIf") {
      orientation = exifOrientation(data);
    } else if (type === "zTXt" || type === "iTXt") {
      const keywordEnd = data.indexOf(0);
      let compressed = null;
      if (type === "zTXt" && keywordEnd >= 0) compressed = data.subarray(keywordEnd + 2);
      if (type === "iTXt" && keywordEnd >= 0 && data[keywordEnd + 1] === 1) {
        // keyword \0 flag method language \0 translated keyword \0 text
        let at = data.indexOf(0, keywordEnd + 3);
        if (at >= 0) at = data.indexOf(0, at + 1);
        if (at >= 0) compressed = data.subarray(at + 1);
      }
      if (compressed && (await inflate(compressed, MAX_TEXT_CHUNK)) === null) {
        throw new ImageDecodeError(
          "corrupt or truncated image: Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK");
      }
    } else if (type === "IEND") {
      ended = true;
      break;
    }
    offset = body + length + 4;
  }
  if (!header) throw new ImageDecodeError("not a recognised image (expected PNG, JPEG or DICOM)");
  return { ...header, frames, idat, ended, orientation };
}

/** The EXIF Orientation tag (0x0112) of a TIFF-structured EXIF block, or 1. */
export function exifOrientation(data) {
  let base = 0;
  if (startsWith(data, ascii("Exif\0\0"))) base = 6;
  const little = startsWith(data, ascii("II"), base);
  if (!little && !startsWith(data, ascii("MM"), base)) return 1;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  try {
    const ifd = base + view.getUint32(base + 4, little);
    const count = view.getUint16(ifd, little);
    for (let i = 0; i < count; i++) {
      const entry = ifd + 2 + i * 12;
      if (view.getUint16(entry, little) === 0x0112) return view.getUint16(entry + 8, little);
    }
  } catch {
    return 1;  // a short or broken block: no orientation, as Pillow reads it
  }
  return 1;
}

/** Pillow's ImageOps.exif_transpose on a greyscale array: orientations 2 to 8 (others leave it as it is). */
export function orient(grey, width, height, orientation) {
  if (!(orientation >= 2 && orientation <= 8)) return { grey, width, height };
  const swap = orientation >= 5;
  const outWidth = swap ? height : width;
  const outHeight = swap ? width : height;
  const out = new Uint8Array(grey.length);
  // For each output (x, y): the source column and row.
  const source = {
    2: (x, y) => [width - 1 - x, y],              // FLIP_LEFT_RIGHT
    3: (x, y) => [width - 1 - x, height - 1 - y], // ROTATE_180
    4: (x, y) => [x, height - 1 - y],             // FLIP_TOP_BOTTOM
    5: (x, y) => [y, x],                          // TRANSPOSE
    6: (x, y) => [y, height - 1 - x],             // ROTATE_270
    7: (x, y) => [width - 1 - y, height - 1 - x], // TRANSVERSE
    8: (x, y) => [width - 1 - y, x],              // ROTATE_90
  }[orientation];
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const [sx, sy] = source(x, y);
      out[y * outWidth + x] = grey[sy * width + sx];
    }
  }
  return { grey: out, width: outWidth, height: outHeight };
}

/** The JPEG's frame size (from its SOF marker) and whether its stream is complete (an EOI after the scan). */
export function readJpeg(bytes) {
  let offset = 2;
  let size = null;
  while (offset + 4 <= bytes.length) {
    if (bytes[offset] !== 0xff) {
      offset += 1;
      continue;
    }
    const marker = bytes[offset + 1];
    if (marker === 0xff || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) {
      offset += marker === 0xff ? 1 : 2;
      continue;
    }
    const length = (bytes[offset + 2] << 8) | bytes[offset + 3];
    const isFrame = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (isFrame && offset + 9 <= bytes.length && size === null) {
      size = { height: (bytes[offset + 5] << 8) | bytes[offset + 6], width: (bytes[offset + 7] << 8) | bytes[offset + 8] };
    }
    if (marker === 0xda) {  // start of scan: the entropy-coded data follows; a complete stream ends in EOI
      let complete = false;
      for (let i = offset + 2 + length; i + 1 < bytes.length; i++) {
        if (bytes[i] === 0xff && bytes[i + 1] === 0xd9) {
          complete = true;
          break;
        }
      }
      return { size, complete };
    }
    offset += 2 + length;
  }
  return { size, complete: false };
}

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

/** PNG row filters undone in place, for `rows` rows of `rowBytes` bytes at `bpp` bytes a pixel. */
function unfilter(raw, offset, rows, rowBytes, bpp, out) {
  let previous = null;
  for (let y = 0; y < rows; y++) {
    const filter = raw[offset + y * (rowBytes + 1)];
    const start = offset + y * (rowBytes + 1) + 1;
    const row = out.subarray(y * rowBytes, (y + 1) * rowBytes);
    for (let x = 0; x < rowBytes; x++) {
      const value = raw[start + x];
      const left = x >= bpp ? row[x - bpp] : 0;
      const up = previous ? previous[x] : 0;
      const upLeft = previous && x >= bpp ? previous[x - bpp] : 0;
      let decoded;
      if (filter === 0) decoded = value;
      else if (filter === 1) decoded = value + left;
      else if (filter === 2) decoded = value + up;
      else if (filter === 3) decoded = value + ((left + up) >> 1);
      else if (filter === 4) decoded = value + paeth(left, up, upLeft);
      else throw new ImageDecodeError(`corrupt or truncated image: unknown PNG filter type ${filter}`);
      row[x] = decoded & 0xff;
    }
    previous = row;
  }
}

const ADAM7 = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2], [0, 1, 1, 2]];

/**
 * An 8- or 16-bit greyscale PNG, decoded here (inflate, unfilter, Adam7): as Pillow reads it, mode "L"
 * as it is (a tRNS colour ignored, as the server ignores it), mode "I;16" stretched min..max to 0..255.
 */
export async function decodePngGrey(png) {
  const { width, height, interlace, bitDepth } = png;
  const bytesPer = bitDepth / 8;
  let length = 0;
  for (const part of png.idat) length += part.length;
  const compressed = new Uint8Array(length);
  let at = 0;
  for (const part of png.idat) {
    compressed.set(part, at);
    at += part.length;
  }
  const passes = interlace ? ADAM7 : [[0, 0, 1, 1]];
  const sizes = passes.map(([x0, y0, dx, dy]) => [Math.max(0, Math.ceil((width - x0) / dx)),
    Math.max(0, Math.ceil((height - y0) / dy))]);
  const expected = sizes.reduce((sum, [w, h]) => sum + (w > 0 && h > 0 ? h * (1 + bytesPer * w) : 0), 0);
  const raw = await inflate(compressed, expected);
  if (raw === null || raw.length < expected) throw truncated();
  const values = bytesPer === 2 ? new Float64Array(width * height) : new Uint8Array(width * height);
  let offset = 0;
  passes.forEach(([x0, y0, dx, dy], pass) => {
    const [w, h] = sizes[pass];
    if (w <= 0 || h <= 0) return;
    const rows = new Uint8Array(h * w * bytesPer);
    unfilter(raw, offset, h, w * bytesPer, bytesPer, rows);
    offset += h * (1 + bytesPer * w);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = (y * w + x) * bytesPer;
        values[(y0 + y * dy) * width + x0 + x * dx] = bytesPer === 2 ? (rows[i] << 8) | rows[i + 1] : rows[i];
      }
    }
  });
  return bytesPer === 2 ? stretchToUint8(values) : values;
}

/** PNG or JPEG bytes through the browser's decoder: RGBA composed on black, EXIF orientation applied. */
export async function decodeWithBrowser(bytes, type) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([bytes], { type }),
      { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
  } catch (error) {
    throw new ImageDecodeError("corrupt or truncated image: the browser could not decode it");
  }
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true, alpha: false });
  context.fillStyle = "#000";  // X-rays are bright on black: transparent areas become black, as on the server
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  return { rgba, width, height };
}

/**
 * Decode a file's bytes to {grey, width, height, spread} (spread: the colour statistic for the checks,
 * null for DICOM), or throw ImageDecodeError with the message the server would give (or one that says
 * this file needs the server). `env` = {limits, checks, dicomParser, browserDecode}.
 */
export async function decodeGreyscale(bytes, env) {
  const { limits, checks } = env;
  checkSize(bytes.length, limits.max_file_bytes);
  const format = sniff(bytes);
  let decoded;
  if (format === "DICOM") {
    decoded = { ...decodeDicom(bytes, env.dicomParser, limits), spread: null };
  } else if (format === "PNG") {
    const png = await readPng(bytes);
    checkDimensions(png.width, png.height, limits, true);
    if (png.frames > 1) throw new ImageDecodeError(`PNG with ${png.frames} frames: upload a single still image`);
    if (!png.ended) throw truncated();
    if ((png.bitDepth === 8 || png.bitDepth === 16) && png.colourType === 0) {
      const oriented = orient(await decodePngGrey(png), png.width, png.height, png.orientation);
      decoded = { ...oriented, spread: 0 };
    } else {
      decoded = fromRgba(await env.browserDecode(bytes, "image/png"), checks);
    }
  } else if (format === "JPEG") {
    const jpeg = readJpeg(bytes);
    if (jpeg.size) checkDimensions(jpeg.size.width, jpeg.size.height, limits, true);
    if (!jpeg.complete) throw truncated();
    decoded = fromRgba(await env.browserDecode(bytes, "image/jpeg"), checks);
  } else if (format in SERVER_ONLY) {
    throw new ImageDecodeError(`${SERVER_ONLY[format]} files are not decoded on this device (PNG, JPEG or DICOM ` +
      "only): use the “On the server” page, or convert to PNG");
  } else {
    throw new ImageDecodeError("not a recognised image (expected PNG, JPEG or DICOM)");
  }
  checkDimensions(decoded.width, decoded.height, limits);
  return decoded;
}

function isGrey(rgba) {
  for (let j = 0; j < rgba.length; j += 4) if (rgba[j] !== rgba[j + 1] || rgba[j] !== rgba[j + 2]) return false;
  return true;
}

function fromRgba({ rgba, width, height }, checks) {
  return {
    grey: rgbaToGrey(rgba),
    width,
    height,
    // Equal channels give a spread of 0 on the server too (a greyscale mode, or a thumbnail of grey RGB).
    spread: isGrey(rgba) ? 0 : thumbnailColourSpread(rgba, width, height, checks.colour_probe_size),
  };
}
