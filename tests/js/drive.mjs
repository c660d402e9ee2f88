// Drives the gateway with the official openai npm SDK, as a Node.js application would,
// and prints what it saw as one JSON object (tests/test_sdk_js.py asserts on it).
//
//   node tests/js/drive.mjs BASE_URL
//
// Each scenario catches its own error, so one failure is reported without hiding the others.
import OpenAI from "openai";

const baseURL = process.argv[2];
const client = new OpenAI({ baseURL, apiKey: "sk-js-sdk", maxRetries: 0, timeout: 20_000 });
const user = (content) => [{ role: "user", content }];

async function chat() {
  const { data, response } = await client.chat.completions
    .create({ model: "auto", messages: user("Hello from Node"), max_tokens: 5 })
    .withResponse();
  return {
    content: data.choices[0].message.content,
    role: data.choices[0].message.role,
    completion_tokens: data.usage.completion_tokens,
    model_header: response.headers.get("x-gateway-model"),
    cost_header: response.headers.get("x-gateway-cost-usd"),
  };
}

async function stream() {
  const chunks = await client.chat.completions.create({
    model: "auto", messages: user("Count"), max_tokens: 8, stream: true,
    stream_options: { include_usage: true },
  });
  const pieces = [];
  let usage = null;
  let lastChoices = null;
  for await (const chunk of chunks) {
    for (const choice of chunk.choices) {
      if (choice.delta?.content) pieces.push(choice.delta.content);
    }
    if (chunk.usage) usage = chunk.usage;
    lastChoices = chunk.choices.length;
  }
  return { pieces: pieces.length, text: pieces.join(""), usage, last_choices: lastChoices };
}

async function streamHelper() {
  // the SDK's own accumulator: it rebuilds the whole completion from the deltas
  const runner = client.chat.completions.stream({ model: "auto", messages: user("Plan"), max_tokens: 6 });
  const completion = await runner.finalChatCompletion();
  return { content: completion.choices[0].message.content, finish_reason: completion.choices[0].finish_reason };
}

async function completions() {
  const completion = await client.completions.create({ model: "auto", prompt: "Once upon a time", max_tokens: 4 });
  return { text: completion.choices[0].text, completion_tokens: completion.usage.completion_tokens };
}

async function embeddings() {
  const result = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
  return { count: result.data.length, dimensions: result.data[0].embedding.length };
}

async function models() {
  const ids = [];
  for await (const model of client.models.list()) ids.push(model.id);
  return { ids };
}

async function unknownModel() {
  try {
    await client.chat.completions.create({ model: "no-such-model", messages: user("Hi") });
    return { raised: false };
  } catch (error) {
    return {
      raised: true, is_api_error: error instanceof OpenAI.APIError, status: error.status,
      type: error.type, code: error.code, message: error.message,
    };
  }
}

async function badJson() {
  // a body the SDK would never send: what any HTTP client gets back for malformed JSON
  const response = await fetch(`${baseURL}/chat/completions`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: "{not json",
  });
  return { status: response.status, body: await response.json() };
}

async function abortMidStream() {
  // a client that walks away after the first chunk: the gateway serves the next request normally
  const controller = new AbortController();
  const chunks = await client.chat.completions.create(
    { model: "auto", messages: user("Long answer"), max_tokens: 200, stream: true },
    { signal: controller.signal },
  );
  let received = 0;
  let aborted = false;
  try {
    for await (const chunk of chunks) {
      received += 1;
      if (received === 1) controller.abort();
    }
  } catch (error) {
    aborted = error instanceof OpenAI.APIUserAbortError || error.name === "AbortError";
  }
  const after = await client.chat.completions.create({ model: "auto", messages: user("Again"), max_tokens: 2 });
  return { received, aborted, after: after.choices[0].message.content };
}

const scenarios = { chat, stream, streamHelper, completions, embeddings, models, unknownModel, badJson, abortMidStream };
const results = {};
for (const [name, run] of Object.entries(scenarios)) {
  try {
    results[name] = { ok: true, value: await run() };
  } catch (error) {
    results[name] = { ok: false, error: `${error.name}: ${error.message}` };
  }
}
process.stdout.write(JSON.stringify(results));
