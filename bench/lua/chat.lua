-- wrk script: POST an OpenAI chat completion; print the run's figures as one JSON line.
--
--   wrk -t1 -c1 -d5s -s bench/lua/chat.lua http://127.0.0.1:PORT/v1/chat/completions \
--       -- MODEL KEYS MODE STREAM NONCE
--
-- MODEL   the model alias to ask for (default gpt-4o-mini)
-- KEYS    comma-separated API keys, used round robin per request ("-" for none)
-- MODE    unique: every request's message differs (cacheable, but always a miss)
--         same: every request is identical (a cache hit after the first)
-- STREAM  true or false (default false)
-- NONCE   a string unique to this run, so "unique" bodies never repeat an earlier run's

local started_threads = 0
thread_id = 0   -- a global: setup() sets it in each thread's own Lua state

function setup(thread)
  started_threads = started_threads + 1
  thread:set("thread_id", started_threads)
end

local model, keys, mode, stream, nonce
local counter = 0

local function split(text)
  local out = {}
  for part in string.gmatch(text, "[^,]+") do
    if part ~= "-" then table.insert(out, part) end
  end
  return out
end

function init(args)
  model = args[1] or "gpt-4o-mini"
  keys = split(args[2] or "-")
  mode = args[3] or "unique"
  stream = (args[4] or "false") == "true"
  nonce = args[5] or tostring(os.time())
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

local TEMPLATE = '{"model":"%s","temperature":0,"max_tokens":16,"stream":%s,'
  .. '"messages":[{"role":"system","content":"You are a concise assistant."},'
  .. '{"role":"user","content":"Request %s: summarise the quarterly report for team %d in two sentences."}]}'

function request()
  counter = counter + 1
  local id, team = "same", 7
  if mode == "unique" then id, team = nonce .. "-" .. thread_id .. "-" .. counter, counter % 97 end
  local headers = {}
  if #keys > 0 then
    headers["Authorization"] = "Bearer " .. keys[(counter % #keys) + 1]
  end
  local body = string.format(TEMPLATE, model, tostring(stream), id, team)
  return wrk.format(nil, nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
