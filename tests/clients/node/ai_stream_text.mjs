// The Vercel AI SDK (`ai` with `@ai-sdk/openai-compatible`) calling tokencast
// with streamText and a tool. Usage:
//   node ai_stream_text.mjs <base url> <model> '<prompt>' [demo options JSON]
// Prints one JSON object: the text and tool calls as the SDK reports them.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText, tool } from "ai";
import { z } from "zod";

const [baseUrl, model, prompt, demoJson] = process.argv.slice(2);
const demo = demoJson ? JSON.parse(demoJson) : undefined;

const tokencast = createOpenAICompatible({
  name: "tokencast",
  baseURL: `${baseUrl}/v1`,
  apiKey: "unused",
  // tokencast's own job fields (demo, metadata) go in the request body.
  transformRequestBody: (body) => (demo ? { ...body, demo } : body),
});

const result = streamText({
  model: tokencast(model),
  prompt,
  tools: {
    get_weather: tool({
      description: "The current weather in a city",
      inputSchema: z.object({ city: z.string() }),
    }),
  },
  maxRetries: 0,
});

const parts = [];
let streamed = "";
let reasoning = "";
for await (const part of result.fullStream) {
  if (part.type === "text-delta") streamed += part.text;
  if (part.type === "reasoning-delta") reasoning += part.text;
  if (part.type === "error") throw part.error;
  parts.push(part.type);
}
const toolCalls = await result.toolCalls;
const response = await result.response;
console.log(
  JSON.stringify({
    response_id: response.id,
    reasoning,
    streamed_text: streamed,
    text: await result.text,
    tool_calls: toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input })),
    finish_reason: await result.finishReason,
    part_types: [...new Set(parts)],
  }),
);
