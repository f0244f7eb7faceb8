-- POST one JSON body (BODY_FILE) to one path (URL_PATH); at the end print one JSON line with the
-- request count, errors and latency percentiles in microseconds, for bench/run.py to read.
-- With TOKENS_FILE (one JWT a line, minted by bench/auth.py: wrk cannot sign ES384) each request carries
-- the next token as "Authorization: Bearer", starting again at the first when the pool runs out (bench/run.py
-- mints more tokens than a run can send; a replayed token would be refused and counted in status_errors).
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.path = os.getenv("URL_PATH")
wrk.headers["Content-Type"] = "application/json"

local tokens = {}
local next_token = 0
local tokens_file = os.getenv("TOKENS_FILE")
if tokens_file then
  for line in io.lines(tokens_file) do
    if line ~= "" then tokens[#tokens + 1] = line end
  end
  assert(#tokens > 0, "TOKENS_FILE holds no token")
  request = function()
    next_token = next_token + 1
    if next_token > #tokens then next_token = 1 end
    local headers = {}
    for name, value in pairs(wrk.headers) do headers[name] = value end
    headers["Authorization"] = "Bearer " .. tokens[next_token]
    return wrk.format(nil, nil, headers, nil)
  end
end

local bad = 0
response = function(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

-- response() runs in the thread's Lua state and done() in the main one, which never sees `bad` change:
-- non-2xx/3xx answers are counted by wrk itself (errors.status, read as status_errors).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"socket_errors":%d,"status_errors":%d,"non200":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    latency.mean, e.connect + e.read + e.write + e.timeout, e.status, bad))
end
