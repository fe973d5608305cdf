// The amskv playground: POST /v1/generate with stream: true and draw the SSE events as they arrive.
// No libraries and no external URL: the page must work on an offline GPU node.
"use strict";

const $ = (id) => document.getElementById(id);
// Every preview shown, in arrival order; the browser test reads it to check the scale order.
window.amskvPreviewLog = [];

function mib(bytes) {
  return (bytes / 2 ** 20).toFixed(2) + " MiB";
}

async function getJson(path) {
  const response = await fetch(path);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

async function loadModel() {
  try {
    const card = (await getJson("/v1/models")).data[0];
    $("model-name").textContent = card.id;
    const kv = card.kv_cache || {bytes_per_image: card.kv_bytes_per_image,
                                  vanilla_bytes_per_image: card.vanilla_kv_bytes_per_image, policy: card.policy};
    $("kv-policy").textContent = kv.policy;
    $("kv-bytes").textContent = mib(kv.bytes_per_image);
    $("kv-vanilla").textContent = mib(kv.vanilla_bytes_per_image);
    $("kv-bar").style.width = (100 * kv.bytes_per_image / kv.vanilla_bytes_per_image).toFixed(1) + "%";
    const classes = (await getJson("/v1/classes")).data;
    const chips = $("class-chips");
    for (const entry of classes) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.textContent = entry.index + " " + (entry.names[0] || "");
      chip.title = entry.wnid || entry.names.join(", ");
      chip.addEventListener("click", () => {
        const field = $("classes");
        field.value = field.value.trim() ? field.value.replace(/[,\s]*$/, ", ") + entry.index : String(entry.index);
      });
      chips.appendChild(chip);
    }
  } catch (err) {
    setTimeout(loadModel, 2000);  // still loading: retry
  }
}

async function pollStatus() {
  try {
    const status = await getJson("/v1/status");
    $("queue-requests").textContent = status.queued_requests;
    $("queue-images").textContent = status.queued_images;
    $("running-images").textContent = status.running_images;
  } catch (err) { /* the next poll retries */ }
  setTimeout(pollStatus, 1000);
}

function parseLabels(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s)
    .map((s) => (/^\d+$/.test(s) ? Number(s) : s));
}

function card(index, label, of) {
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.index = index;
  element.innerHTML = `<h3>image ${index} · class ${label}</h3>
    <div class="scale-label">scale <span class="scale">-</span> of ${of}</div>
    <div class="strip"></div>
    <img class="final" alt="image ${index}">
    <a class="download" hidden>download PNG</a>`;
  $("images").appendChild(element);
  return element;
}

// Server-Sent Events from a fetch body (EventSource cannot POST).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield {event, data: JSON.parse(data)};
    }
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function generate(event) {
  event.preventDefault();
  const labels = parseLabels($("classes").value);
  const n = Number($("n").value);
  const body = {class_labels: labels, n, seed: Number($("seed").value), cfg_scale: Number($("cfg").value),
                top_p: Number($("top-p").value), stream: true};
  if ($("top-k").value !== "") body.top_k = Number($("top-k").value);
  $("images").innerHTML = "";
  clearError();
  window.amskvPreviewLog = [];
  delete document.body.dataset.done;
  $("generate").disabled = true;
  $("state").textContent = "queued…";
  const cards = [];
  try {
    const response = await fetch("/v1/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                   body: JSON.stringify(body)});
    if (!response.ok) {
      const failed = await response.json();
      throw new Error(failed.error ? failed.error.message : response.statusText);
    }
    for await (const {event: kind, data} of sseEvents(response)) {
      if (kind === "preview") {
        const target = cards[data.index] || (cards[data.index] = card(data.index, labels[Math.floor(data.index / n)], data.of));
        const img = document.createElement("img");
        img.className = "preview";
        img.dataset.scale = data.scale;
        img.title = `scale ${data.scale + 1} of ${data.of}`;
        img.src = "data:image/png;base64," + data.b64_json;
        target.querySelector(".strip").appendChild(img);
        target.querySelector(".scale").textContent = data.scale + 1;
        target.querySelector(".final").src = img.src;
        window.amskvPreviewLog.push({index: data.index, scale: data.scale});
        $("state").textContent = "generating…";
      } else if (kind === "image") {
        const target = cards[data.index] || (cards[data.index] = card(data.index, data.class_label, "-"));
        const final = target.querySelector(".final");
        final.src = "data:image/png;base64," + data.b64_json;
        final.dataset.final = "true";
        final.alt = `image ${data.index}, class ${data.class_label}, seed ${data.seed}`;
        const link = target.querySelector(".download");
        link.href = final.src;
        // the file names of `amskv generate` and the zip answer (amskv/naming.py): 000_c7_s21.png
        link.download = `${String(data.index).padStart(3, "0")}_c${data.class_label}_s${data.seed}.png`;
        link.hidden = false;
      } else if (kind === "done") {
        $("batch-images").textContent = data.usage.batch_images;
        $("batches").textContent = data.usage.batches;
        $("queue-time").textContent = (1000 * data.usage.queue_time_s).toFixed(0) + " ms";
        $("state").textContent = `done: ${data.usage.images} image(s) in ${data.usage.inference_time_s.toFixed(2)} s`;
        document.body.dataset.done = "true";
      } else if (kind === "error") {
        throw new Error(data.error.message);
      }
    }
  } catch (err) {
    showError(err.message);
    $("state").textContent = "failed";
    document.body.dataset.done = "failed";
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
// A submit the browser blocks (a field out of range, classes empty) fires "invalid" instead of "submit": the
// error of an earlier request no longer describes what is on screen. "invalid" does not bubble, so capture it.
$("form").addEventListener("invalid", () => {
  clearError();
  $("state").textContent = "";
}, true);
loadModel();
pollStatus();
