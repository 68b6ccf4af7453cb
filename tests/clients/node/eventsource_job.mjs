// Node's `eventsource` package (the browser's EventSource API) reading a job's
// native stream, resuming by itself (Last-Event-ID) when the connection drops.
// Usage: node eventsource_job.mjs <base url> <job id>
// Prints one JSON line per event as it arrives, then {"closed": true} after `done`.
import { EventSource } from "eventsource";

const [baseUrl, jobId] = process.argv.slice(2);
const source = new EventSource(`${baseUrl}/v1/jobs/${jobId}/events`);

function print(name) {
  return (event) => {
    console.log(JSON.stringify({ id: event.lastEventId, name, data: JSON.parse(event.data) }));
    if (name === "done") {
      source.close();
      console.log(JSON.stringify({ closed: true }));
    }
  };
}
for (const name of ["start", "token", "reasoning", "tool_call", "done"]) {
  source.addEventListener(name, print(name));
}
// A dropped connection: the package reconnects after the stream's retry: delay.
source.onerror = () => console.log(JSON.stringify({ error: true }));
