#!/usr/bin/env node
// Renders the anime-avatar data set that sd-rs's default model is trained on.
//
//   cd scripts/avatars && npm ci && cd ../..
//   node scripts/avatars/render.mjs --out data/avatars --count 20000 --seed 0
//
// Each avatar is DiceBear's "Adventurer" style (artwork by Lisa Wischofsky, CC BY 4.0; see
// README.md for the credit the project must carry). Every attribute is drawn by this script from
// its own seeded generator and handed to DiceBear as a one-element list, so DiceBear's own
// hash-of-seed randomness never decides anything: the caption is the truth about the picture.
//
// Output (paths in the jsonl files are relative to --out):
//   images/000000.png ...   64x64 RGB PNGs
//   data.jsonl              {"file_name": "images/000000.png", "text": "<caption>"} per image
//   attributes.jsonl        the structured attributes of each image, for evaluation
//   masks/*.png             per-pixel maps of where hair, glasses, eyes, mouth and bare skin
//                           appear (0..255), for scripts/eval_prompt_following.py
//   contact_sheet.png       the first 64 images, 8x8, upscaled 2x
//   ATTRIBUTION.txt         the licence of the artwork
//
// The same --seed gives byte-identical files with the same package versions (package-lock.json)
// and Node build; rendering is split over worker threads but never depends on the split.

import { createAvatar } from '@dicebear/core';
import * as adventurer from '@dicebear/adventurer';
import { Resvg } from '@resvg/resvg-js';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

const SIZE = 64;
const HERE = path.dirname(fileURLToPath(import.meta.url));
const VOCAB = JSON.parse(fs.readFileSync(path.join(HERE, 'vocabulary.json'), 'utf8'));

// ---------------------------------------------------------------------------------------------
// Deterministic attribute sampling.

// mulberry32: tiny, well-mixed 32-bit generator; one stream per image so that image i does not
// depend on how many random numbers images 0..i-1 consumed (and workers can't perturb it).
function mulberry32(state) {
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function imageRng(seed, index) {
  // Mix seed and index through a few generator steps so neighbouring indices are unrelated.
  const mix = mulberry32((Math.imul(seed, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) | 0);
  mix();
  return mulberry32(Math.floor(mix() * 4294967296) | 0);
}

// entries: [[phrase, weight, values], ...] -> one entry, proportional to weight.
function pickWeighted(rng, entries) {
  const total = entries.reduce((s, e) => s + e[1], 0);
  let r = rng() * total;
  for (const e of entries) {
    r -= e[1];
    if (r < 0) return e;
  }
  return entries[entries.length - 1];
}

function pickOne(rng, list) {
  return list[Math.min(list.length - 1, Math.floor(rng() * list.length))];
}

// The draw order below is part of the data set's definition: changing it changes every image.
function sampleAttributes(seed, index) {
  const rng = imageRng(seed, index);
  const hairColor = pickWeighted(rng, VOCAB.hair_color);
  const hairStyle = pickWeighted(rng, VOCAB.hair_style);
  const eyes = pickWeighted(rng, VOCAB.eyes);
  const expression = pickWeighted(rng, VOCAB.expression);
  const glasses = pickWeighted(rng, VOCAB.glasses);
  const earrings = pickWeighted(rng, VOCAB.earrings);
  const feature = pickWeighted(rng, VOCAB.feature);
  const skin = pickWeighted(rng, VOCAB.skin);
  const background = pickWeighted(rng, VOCAB.background);
  const shortCaption = rng() < VOCAB.short_caption_probability;
  return {
    hair_color: hairColor[0],
    hair_color_hex: hairColor[2],
    hair_style: hairStyle[0],
    hair: pickOne(rng, hairStyle[2]),
    eyes: eyes[0],
    eyes_variant: pickOne(rng, eyes[2]),
    expression: expression[0],
    mouth: pickOne(rng, expression[2]),
    eyebrows: pickOne(rng, VOCAB.eyebrows),
    glasses: glasses[0],
    glasses_variant: glasses[2].length ? pickOne(rng, glasses[2]) : null,
    earrings: earrings[0],
    earrings_variant: earrings[2].length ? pickOne(rng, earrings[2]) : null,
    feature: feature[0],
    skin: skin[0],
    skin_hex: skin[2],
    background: background[0],
    background_hex: background[2],
    caption: shortCaption ? 'short' : 'full',
  };
}

// Every option is a one-element list or a 0/100 probability, so DiceBear's PRNG has no choice left.
function dicebearOptions(a) {
  return {
    seed: 'sd-rs',
    backgroundType: ['solid'],
    backgroundColor: [a.background_hex],
    skinColor: [a.skin_hex],
    hairColor: [a.hair_color_hex],
    hair: [a.hair],
    hairProbability: 100,
    eyes: [a.eyes_variant],
    eyebrows: [a.eyebrows],
    mouth: [a.mouth],
    glasses: [a.glasses_variant ?? 'variant01'],
    glassesProbability: a.glasses_variant ? 100 : 0,
    earrings: [a.earrings_variant ?? 'variant01'],
    earringsProbability: a.earrings_variant ? 100 : 0,
    features: [a.feature === 'none' ? 'blush' : a.feature],
    featuresProbability: a.feature === 'none' ? 0 : 100,
  };
}

// Fixed phrase order: the subject and hair colour always lead (matching prompts such as
// "anime girl, red hair"), and a word-level text encoder sees each attribute at a stable position.
function caption(a) {
  const phrases = [VOCAB.subject, `${a.hair_color} hair`];
  if (a.caption === 'short') return phrases.join(', ');
  phrases.push(a.hair_style, a.eyes, a.expression);
  if (a.glasses !== 'none') phrases.push(a.glasses);
  if (a.earrings !== 'none') phrases.push(a.earrings);
  if (a.feature !== 'none') phrases.push(a.feature);
  phrases.push(a.skin, `${a.background} background`);
  return phrases.join(', ');
}

// ---------------------------------------------------------------------------------------------
// Rasterising and PNG writing.

// Render the SVG at SIZE*ss and average ss x ss blocks: area averaging of a supersampled render is
// the right low-pass for flat vector art (no ringing as with Lanczos, no aliasing of thin outlines).
function rasterize(svg, ss) {
  const big = SIZE * ss;
  const { pixels } = new Resvg(svg, { fitTo: { mode: 'width', value: big } }).render();
  if (pixels.length !== big * big * 4) throw new Error(`resvg returned ${pixels.length} bytes, expected ${big * big * 4}`);
  const out = Buffer.alloc(SIZE * SIZE * 3);
  const n = ss * ss;
  for (let y = 0; y < SIZE; y++) {
    for (let x = 0; x < SIZE; x++) {
      let r = 0, g = 0, b = 0;
      for (let dy = 0; dy < ss; dy++) {
        let p = ((y * ss + dy) * big + x * ss) * 4;
        for (let dx = 0; dx < ss; dx++, p += 4) {
          // Every avatar has an opaque background rect, so alpha must be 255 everywhere.
          if (pixels[p + 3] !== 255) throw new Error(`transparent pixel at (${x * ss + dx}, ${y * ss + dy})`);
          r += pixels[p];
          g += pixels[p + 1];
          b += pixels[p + 2];
        }
      }
      const o = (y * SIZE + x) * 3;
      out[o] = Math.floor((r + n / 2) / n);
      out[o + 1] = Math.floor((g + n / 2) / n);
      out[o + 2] = Math.floor((b + n / 2) / n);
    }
  }
  return out;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(buf) {
  let c = 0xffffffff;
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

// Minimal PNG encoder (8-bit, colour type 2 = RGB or 0 = grey, no interlace). Written out rather
// than pulled from a package so that every byte of the file is determined by this script.
function encodePng(pixels, width, height, channels) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8;
  ihdr[9] = channels === 3 ? 2 : 0;
  const stride = width * channels;
  const raw = Buffer.alloc((stride + 1) * height);
  for (let y = 0; y < height; y++) {
    raw[y * (stride + 1)] = 0; // filter type None: flat colours already deflate well
    pixels.copy(raw, y * (stride + 1) + 1, y * stride, (y + 1) * stride);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(raw, { level: 9 })),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Worker: render the SVGs it is sent and write the PNGs.

if (!isMainThread) {
  const { outDir, supersample } = workerData;
  parentPort.on('message', (jobs) => {
    const previews = [];
    for (const { index, svg, fileName } of jobs) {
      const rgb = rasterize(svg, supersample);
      fs.writeFileSync(path.join(outDir, fileName), encodePng(rgb, SIZE, SIZE, 3));
      if (index < 64) previews.push({ index, rgb });
    }
    parentPort.postMessage({ done: jobs.length, previews });
  });
}

// ---------------------------------------------------------------------------------------------
// Evaluation masks, from renders that differ in one attribute only. Every component of the style
// sits at a fixed place on a fixed head, so a per-pixel map of where each attribute can show up
// holds for every image in the set.

// A plain face: closed eyes and a small mouth keep the eye and mouth areas mostly skin.
const MASK_BASE = {
  hair_color_hex: 'ff0000', hair: 'short01', eyes_variant: 'variant19', mouth: 'variant09', eyebrows: 'variant10',
  glasses_variant: null, earrings_variant: null, feature: 'none', skin_hex: 'f2d3b1', background_hex: 'ffffff',
};

// The glasses-frame region the evaluator looks at, and its thresholds, were calibrated on these
// three frames (the data set's glasses until 2026-12-06); the region stays the same whichever of
// them the vocabulary uses now, so old and new measurements compare.
const EVAL_GLASSES_FRAMES = ['variant02', 'variant04', 'variant05'];

function renderForMask(attrs, supersample, withHair) {
  const opts = dicebearOptions(attrs);
  if (!withHair) opts.hairProbability = 0;
  return rasterize(createAvatar(adventurer, opts).toString(), supersample);
}

// Fraction of `alternatives` whose render differs visibly (by more than 24 in some channel) from
// the render of `base`, per pixel. Hair is left off so that the map is the component's whole
// footprint; the evaluator discounts pixels the hair may cover with the hair map.
function changeFrequency(base, alternatives, supersample) {
  const ref = renderForMask(base, supersample, false);
  const acc = new Float64Array(SIZE * SIZE);
  for (const alt of alternatives) {
    const img = renderForMask({ ...base, ...alt }, supersample, false);
    for (let i = 0; i < SIZE * SIZE; i++) {
      const d = Math.max(Math.abs(img[3 * i] - ref[3 * i]), Math.abs(img[3 * i + 1] - ref[3 * i + 1]), Math.abs(img[3 * i + 2] - ref[3 * i + 2]));
      if (d > 24) acc[i] += 1 / alternatives.length;
    }
  }
  return acc;
}

const toByte = (acc) => Buffer.from(Array.from(acc, (v) => Math.round(255 * Math.min(1, v))));
const union = (...maps) => Float64Array.from(maps[0], (_, i) => (maps.some((m) => m[i] > 0) ? 1 : 0));

function evaluationMasks(supersample) {
  // Hair is the top layer apart from earrings, so the pixels that change with the hair colour are
  // exactly the visible hair. Pure red vs pure green makes |dR|/255 the hair's coverage of a pixel,
  // and the map is the coverage averaged over hair styles as often as the data set draws them.
  const total = VOCAB.hair_style.reduce((s, e) => s + e[1], 0);
  const hair = new Float64Array(SIZE * SIZE);
  for (const [, weight, variants] of VOCAB.hair_style) {
    for (const v of variants) {
      const a = renderForMask({ ...MASK_BASE, hair: v }, supersample, true);
      const b = renderForMask({ ...MASK_BASE, hair: v, hair_color_hex: '00ff00' }, supersample, true);
      for (let i = 0; i < SIZE * SIZE; i++) hair[i] += (weight / total / variants.length) * (Math.abs(a[3 * i] - b[3 * i]) / 255);
    }
  }
  const variantsOf = (key, name) => VOCAB[key].find((e) => e[0] === name)[2];
  const glasses = changeFrequency(MASK_BASE, EVAL_GLASSES_FRAMES.map((v) => ({ glasses_variant: v })), supersample);
  const sunglasses = changeFrequency(MASK_BASE, variantsOf('glasses', 'sunglasses').map((v) => ({ glasses_variant: v })), supersample);
  // Union of every eye variant's footprint, and the same for mouths and cheek features: each
  // variant is compared with two references so the reference's own footprint is covered too.
  const footprint = (field, values, refs) => union(...refs.map((r) => changeFrequency({ ...MASK_BASE, [field]: r }, values.map((v) => ({ [field]: v })), supersample)));
  const eyeVariants = VOCAB.eyes.flatMap((e) => e[2]);
  const mouthVariants = VOCAB.expression.flatMap((e) => e[2]);
  const eyes = footprint('eyes_variant', eyeVariants, ['variant19', 'variant01']);
  const mouth = footprint('mouth', mouthVariants, ['variant09', 'variant05']);
  const eyebrows = footprint('eyebrows', VOCAB.eyebrows, ['variant10', 'variant03']);
  const features = changeFrequency(MASK_BASE, [{ feature: 'blush' }, { feature: 'freckles' }], supersample);
  const earrings = changeFrequency(MASK_BASE, variantsOf('earrings', 'earrings').map((v) => ({ earrings_variant: v })), supersample);
  // Bare skin: pixels that change with the skin colour and that no face component ever touches.
  const skinChange = changeFrequency(MASK_BASE, [{ skin_hex: '00ff00' }], supersample);
  const covered = union(glasses, sunglasses, eyes, mouth, eyebrows, features, earrings);
  const skin = Float64Array.from(skinChange, (v, i) => (v > 0 && !covered[i] ? 1 : 0));
  return { hair, glasses, sunglasses, eyes, mouth, skin };
}

function contactSheet(previews, scale) {
  const cols = 8, rows = Math.ceil(previews.length / cols);
  const w = cols * SIZE * scale, h = rows * SIZE * scale;
  const out = Buffer.alloc(w * h * 3, 255);
  previews.forEach(({ rgb }, k) => {
    const x0 = (k % cols) * SIZE * scale, y0 = Math.floor(k / cols) * SIZE * scale;
    for (let y = 0; y < SIZE * scale; y++) {
      for (let x = 0; x < SIZE * scale; x++) {
        const s = (Math.floor(y / scale) * SIZE + Math.floor(x / scale)) * 3;
        rgb.copy(out, ((y0 + y) * w + x0 + x) * 3, s, s + 3);
      }
    }
  });
  return encodePng(out, w, h, 3);
}

const ATTRIBUTION = `Images in this folder are rendered from the DiceBear "Adventurer" avatar style
(@dicebear/adventurer 9.4.3, https://www.dicebear.com/styles/adventurer/).

Design: Remix of "Adventurer" (https://www.figma.com/community/file/1184595184137881796)
by "Lisa Wischofsky" (https://www.instagram.com/lischi_art/), licensed under "CC BY 4.0"
(https://creativecommons.org/licenses/by/4.0/).
Changes: attributes chosen and recoloured by sd-rs's scripts/avatars/render.mjs, rasterised and
downsampled to 64x64 pixels.
DiceBear code: MIT License, Copyright (c) 2024 Florian Körner.
`;

// ---------------------------------------------------------------------------------------------
// Main: sample attributes, farm out the rendering, write the metadata.

async function main() {
  const { values } = parseArgs({
    options: {
      out: { type: 'string' },
      count: { type: 'string', default: '20000' },
      seed: { type: 'string', default: '0' },
      workers: { type: 'string', default: String(Math.min(2, os.availableParallelism())) },
      supersample: { type: 'string', default: '4' },
      masks: { type: 'string' },
      'glasses-variants': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || !values.out) {
    console.error('usage: node render.mjs --out DIR [--count 20000] [--seed 0] [--workers 2] [--supersample 4] [--masks DIR] [--glasses-variants variant02,...]');
    process.exit(values.help ? 0 : 2);
  }
  const outDir = values.out;
  const int = (name, min, max) => {
    const v = Number(values[name]);
    if (!Number.isInteger(v) || v < min || v > max) throw new Error(`--${name} must be an integer in [${min}, ${max}], got ${values[name]}`);
    return v;
  };
  // Seeds are mixed as 32-bit integers, and file names have six digits.
  const count = int('count', 0, 999_999), seed = int('seed', 0, 2 ** 32 - 1);
  const workers = int('workers', 1, 64), supersample = int('supersample', 1, 16);
  // The first two training stages of the shipped model saw three glasses variants; this brings
  // that data set back. Image i draws the same random numbers whatever the list, so only the
  // glasses of the "glasses" images change.
  if (values['glasses-variants'] !== undefined) {
    const list = values['glasses-variants'].split(',').map((v) => v.trim());
    if (list.some((v) => !/^variant\d\d$/.test(v))) throw new Error(`--glasses-variants takes DiceBear Adventurer glasses names such as variant02,variant05, got ${values['glasses-variants']}`);
    VOCAB.glasses.find((e) => e[0] === 'glasses')[2] = list;
  }
  fs.mkdirSync(path.join(outDir, 'images'), { recursive: true });
  const t0 = performance.now();

  const records = Array.from({ length: count }, (_, index) => ({
    index,
    fileName: `images/${String(index).padStart(6, '0')}.png`,
    attrs: sampleAttributes(seed, index),
  }));
  // SVGs are made here, just before they are sent, and DiceBear's own report of the components
  // decides visibility: it drops earrings under some long hair styles.
  const svgFor = (r) => {
    const avatar = createAvatar(adventurer, dicebearOptions(r.attrs)).toJson();
    if (r.attrs.earrings !== 'none' && !avatar.extra.earrings) {
      r.attrs.earrings = 'none';
      r.attrs.earrings_variant = null;
    }
    return avatar.svg;
  };

  // Workers pull batches as they finish, so a slow core never leaves the other idle.
  const previews = [];
  let next = 0, done = 0, lastReport = 0;
  const batch = 100;
  const report = (final) => {
    const s = (performance.now() - t0) / 1000;
    const line = `rendered ${done}/${count} images, ${s.toFixed(1)} s, ${(done / Math.max(s, 1e-9)).toFixed(0)} img/s`;
    if (process.stderr.isTTY) process.stderr.write(`\r${line}${final ? '\n' : ''}`);
    else if ((final && done !== lastReport) || done - lastReport >= 2000) {
      process.stderr.write(`${line}\n`);
      lastReport = done;
    }
  };
  await Promise.all(
    Array.from({ length: Math.min(workers, Math.max(1, Math.ceil(count / batch))) }, () => new Promise((resolve, reject) => {
      const w = new Worker(fileURLToPath(import.meta.url), { workerData: { outDir, supersample } });
      const send = () => {
        if (next >= count) {
          w.terminate().then(resolve, reject);
          return;
        }
        const jobs = records.slice(next, next + batch).map((r) => ({ index: r.index, svg: svgFor(r), fileName: r.fileName }));
        next += jobs.length;
        w.postMessage(jobs);
      };
      w.on('message', (m) => {
        done += m.done;
        for (const p of m.previews) previews.push({ index: p.index, rgb: Buffer.from(p.rgb) });
        report(false);
        send();
      });
      w.on('error', reject);
      send();
    })),
  );
  report(true);

  const dataLines = records.map((r) => JSON.stringify({ file_name: r.fileName, text: caption(r.attrs) }));
  const attrLines = records.map((r) => JSON.stringify({ file_name: r.fileName, text: caption(r.attrs), ...r.attrs }));
  fs.writeFileSync(path.join(outDir, 'data.jsonl'), dataLines.map((l) => l + '\n').join(''));
  fs.writeFileSync(path.join(outDir, 'attributes.jsonl'), attrLines.map((l) => l + '\n').join(''));
  fs.writeFileSync(path.join(outDir, 'ATTRIBUTION.txt'), ATTRIBUTION);
  previews.sort((a, b) => a.index - b.index);
  if (previews.length) fs.writeFileSync(path.join(outDir, 'contact_sheet.png'), contactSheet(previews, 2));

  const maskDir = values.masks ?? path.join(outDir, 'masks');
  fs.mkdirSync(maskDir, { recursive: true });
  for (const [name, map] of Object.entries(evaluationMasks(supersample))) {
    fs.writeFileSync(path.join(maskDir, `${name}.png`), encodePng(toByte(map), SIZE, SIZE, 1));
  }
  console.error(`wrote ${count} images, data.jsonl, attributes.jsonl, masks in ${maskDir}, ${((performance.now() - t0) / 1000).toFixed(1)} s total`);
}

if (isMainThread) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
