// The watch page: /watch/<id>[?token=…] follows one job.

import { Viewer } from "./viewer.js";

const jobId = decodeURIComponent(location.pathname.split("/").pop());
const token = new URLSearchParams(location.search).get("token");
new Viewer(document.getElementById("viewer"), jobId, { token }).start();
