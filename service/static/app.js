"use strict";
// The page posts the chosen file as the raw request body to /predict and draws the answer.
const $ = (id) => document.getElementById(id);
let current = null;
const UNCERTAIN_TEXT = {
  not_a_garment: "This does not look like a piece of clothing, so the label above is only a guess.",
  low_confidence: "The service is not sure about this one: the label above is only its best guess.",
};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
}

function showAnswer(answer) {
  $("error").hidden = true;
  $("label").textContent = answer.label;
  $("confidence").textContent = `${(answer.confidence * 100).toFixed(1)}%`;
  // An answer the service does not trust is shown as a guess, with the service's reason in words.
  $("result").classList.toggle("doubtful", answer.uncertain);
  $("uncertain").hidden = !answer.uncertain;
  $("uncertain").textContent = answer.uncertain ? UNCERTAIN_TEXT[answer.reason] || "The service is not sure." : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const li = document.createElement("li");
    if (name === answer.label) li.className = "top";
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, p * 100)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(p * 100).toFixed(1)}%`;
    li.append(label, bar, pct);
    bars.append(li);
  }
  $("result").hidden = false;
}

// The service's own sentence for people (its error body's "message"), never a status code or error code.
async function refusal(response) {
  try {
    const message = (await response.json()).error.message;
    if (message) {
      const sentence = message.charAt(0).toUpperCase() + message.slice(1);
      return /[.!?]$/.test(sentence) ? sentence : `${sentence}.`;
    }
  } catch (_) {
    // not the service's JSON error (a proxy's page, say): fall through to a plain sentence
  }
  return "The service could not classify this image. Please try again or choose another image.";
}

async function classify() {
  if (!current) return;
  const type = current.type || "application/octet-stream";
  try {
    const response = await fetch(`/predict?invert=${$("invert").value}`, {
      method: "POST", headers: { "Content-Type": type }, body: current,
    });
    if (response.ok) showAnswer(await response.json());
    else showError(await refusal(response));
  } catch (error) {
    showError(`The service did not answer: ${error.message}`);
  }
}

function choose(file) {
  if (!file) return;
  current = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  classify();
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
$("invert").addEventListener("change", classify);
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => { event.preventDefault(); choose(event.dataTransfer.files[0]); });

fetch("/model").then((r) => (r.ok ? r.json() : null)).then((card) => {
  if (card) $("model").textContent = `model ${card.name} ${card.version} on ${card.device}`;
}).catch(() => {});
