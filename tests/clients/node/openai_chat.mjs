// The official `openai` npm package streaming a chat completion from tokencast.
// Usage: node openai_chat.mjs <base url> '<request JSON: model, messages, tools?, demo?>'
// Prints one JSON object: the job id, the text and tool calls as the package's
// own stream helper accumulated them, and what a hand-written loop saw.
import OpenAI from "openai";

const [baseUrl, requestJson] = process.argv.slice(2);
const request = JSON.parse(requestJson);
const client = new OpenAI({ baseURL: `${baseUrl}/v1`, apiKey: "unused", maxRetries: 0 });

// The loop most code has: create({stream: true}) and read each chunk's delta.
const { data: stream, response } = await client.chat.completions
  .create({ ...request, stream: true })
  .withResponse();
let text = "";
let reasoning = ""; // not in the package's types: reasoning models' own field
const calls = [];
let finishReason = null;
const chunkIds = new Set();
for await (const chunk of stream) {
  chunkIds.add(chunk.id);
  const choice = chunk.choices[0];
  if (!choice) continue;
  text += choice.delta.content ?? "";
  reasoning += choice.delta.reasoning_content ?? "";
  for (const fragment of choice.delta.tool_calls ?? []) {
    const call = (calls[fragment.index] ??= { id: "", name: "", arguments: "" });
    call.id ||= fragment.id ?? "";
    call.name ||= fragment.function?.name ?? "";
    call.arguments += fragment.function?.arguments ?? "";
  }
  finishReason = choice.finish_reason ?? finishReason;
}

// The package's accumulator: chat.completions.stream() and finalChatCompletion().
const runner = client.chat.completions.stream({ ...request, stream: true });
const final = await runner.finalChatCompletion();
const message = final.choices[0].message;

console.log(
  JSON.stringify({
    job: response.headers.get("x-tokencast-job"),
    chunk_ids: [...chunkIds],
    reasoning,
    text,
    tool_calls: calls,
    finish_reason: finishReason,
    final: {
      content: message.content,
      tool_calls: (message.tool_calls ?? []).map((c) => ({
        id: c.id,
        name: c.function.name,
        arguments: c.function.arguments,
      })),
      finish_reason: final.choices[0].finish_reason,
    },
  }),
);
