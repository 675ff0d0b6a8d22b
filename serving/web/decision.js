// The decision rules of scoring/decision.py and scoring/orientation.py, for the on-device page and its tests:
// no DOM, no network, runs in Node too. Every threshold, name and sentence comes from the page's config
// (config.json: the artefact's decision metadata, and the words serving.ondevice reads from the Python
// modules); nothing here is retyped from them.

/** Decision.label: the class name at the decision threshold. */
export function label(decision, probability) {
  return decision.class_names[probability >= decision.threshold ? 1 : 0];
}

/** Decision.triaged: NORMAL, PNEUMONIA or REVIEW (`review`, the name for the uncertain middle). */
export function triaged(decision, probability, review) {
  const triage = decision.triage;
  if (!triage || !Object.keys(triage).length) return label(decision, probability);
  if (probability < triage.normal_below) return decision.class_names[0];
  if (probability >= triage.pneumonia_from) return decision.class_names[1];
  return review;
}

/** Decision.subtype: BACTERIAL or VIRAL (`names`, in that order) for a PNEUMONIA label, else null. */
export function subtype(decision, probability, probabilityViral, names) {
  if (label(decision, probability) !== decision.class_names[1]) return null;
  return names[probabilityViral >= decision.subtype_threshold ? 1 : 0];
}

/** Decision.orientation: the orientation index the orientation output gives with at least
 * orientation_confidence (the turn on its own, summed over mirrored and not; the mirror given the turn),
 * or null when the model is not that sure which way up the X-ray is; upright (0) when the orientation
 * output is not used (orientation_confidence null). */
export function orientation(decision, probabilities) {
  if (decision.orientation_confidence === null || decision.orientation_confidence === undefined) return 0;
  const turns = Math.floor(probabilities.length / 2);
  const byTurn = [];
  for (let k = 0; k < turns; k++) byTurn.push(Number(probabilities[k]) + Number(probabilities[k + turns]));
  let turn = 0;
  for (let k = 1; k < turns; k++) if (byTurn[k] > byTurn[turn]) turn = k;  // the first of equals, as max()
  if (byTurn[turn] < decision.orientation_confidence) return null;
  const mirrored = Number(probabilities[turn + turns]) >= decision.orientation_confidence * byTurn[turn];
  return turn + (mirrored ? turns : 0);
}

/** Decision.refusal: the gate's sentence (`sentence`) when the OOD score is above its limit, else null. */
export function refusal(decision, oodScore, sentence) {
  const gate = decision.ood;
  if (!gate || gate.limit === undefined || gate.limit === null || oodScore === null || oodScore === undefined) {
    return null;
  }
  return oodScore > Number(gate.limit) ? sentence : null;
}

/** scoring.orientation.upright: a greyscale image (row-major, width x height) found in `orientation`
 * (i >= turns: mirrored first, then turned anticlockwise i % turns quarter turns), put back upright:
 * np.rot90(image, -(i % turns)) and then, when mirrored, image[:, ::-1]. */
export function upright(grey, width, height, index, turns = 4) {
  const quarter = index % turns;
  const mirrored = index >= turns;
  const swap = quarter % 2 === 1;
  const outWidth = swap ? height : width;
  const outHeight = swap ? width : height;
  const out = new Uint8Array(grey.length);
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const u = mirrored ? outWidth - 1 - x : x;  // the column before the mirror
      let sx, sy;
      if (quarter === 0) [sx, sy] = [u, y];
      else if (quarter === 1) [sx, sy] = [y, height - 1 - u];         // turned clockwise once
      else if (quarter === 2) [sx, sy] = [width - 1 - u, height - 1 - y];
      else [sx, sy] = [width - 1 - y, u];                              // turned anticlockwise once
      out[y * outWidth + x] = grey[sy * width + sx];
    }
  }
  return { grey: out, width: outWidth, height: outHeight };
}

/** How the page shows a probability, as the server page does (scoring.wording.percent): percent with one
 * decimal, "< 0.1%" below `floor` and "> 99.9%" above `ceiling` (both from the page's config), "" for none. */
export function percent(value, floor, ceiling) {
  if (value === null || value === undefined) return "";
  if (value < floor) return `< ${(100 * floor).toFixed(1)}%`;
  if (value > ceiling) return `> ${(100 * ceiling).toFixed(1)}%`;
  return `${(100 * value).toFixed(1)}%`;
}
