// The start page: a prompt goes in, a shareable watch link and the live text come out.

import { describeError, request } from "./api.js";
import { copyText } from "./page.js";
import { Viewer } from "./viewer.js";

const form = document.getElementById("start");
const prompt = document.getElementById("prompt");
const model = document.getElementById("model");
const maxTokens = document.getElementById("max-tokens");
const generate = document.getElementById("generate");
const formError = document.getElementById("form-error");
const share = document.getElementById("share");
const watchLink = document.getElementById("watch-link");
const copyLink = document.getElementById("copy-link");
const copyNote = document.getElementById("copy-note");
let viewer = null;

function showError(words) {
  formError.textContent = words;
  formError.hidden = !words;
}

async function loadModels() {
  const result = await request("GET", "/v1/models");
  if (!result.ok) {
    // The server's default model still works: the picker keeps its one option.
    showError(describeError(result, "list the models"));
    return;
  }
  const options = result.body.data.map((entry) => new Option(entry.id, entry.id));
  model.replaceChildren(...options);
}

async function submit(event) {
  event.preventDefault();
  showError("");
  generate.disabled = true;
  generate.textContent = "Starting…";
  const body = { prompt: prompt.value, max_tokens: Number(maxTokens.value) };
  if (model.value) body.model = model.value;
  const result = await request("POST", "/v1/jobs", body);
  generate.disabled = false;
  generate.textContent = "Generate";
  if (!result.ok) {
    showError(describeError(result, "start a generation"));
    return;
  }
  // watch_url carries the viewer token when viewer authentication is on.
  const watchUrl = new URL(result.body.watch_url, location.origin);
  watchLink.href = watchUrl.href;
  watchLink.textContent = watchUrl.href;
  copyNote.textContent = "";
  share.hidden = false;
  if (viewer) viewer.stop();
  viewer = new Viewer(document.getElementById("viewer"), result.body.id, {
    token: watchUrl.searchParams.get("token"),
  });
  viewer.start();
}

copyLink.addEventListener("click", async () => {
  const copied = await copyText(watchLink.href);
  copyNote.textContent = copied
    ? "Copied."
    : "Could not copy; select the link and copy it by hand.";
});
form.addEventListener("submit", submit);
loadModels();
