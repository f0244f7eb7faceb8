-- POST one JSON body (BODY_FILE) to one path (URL_PATH); at the end print one JSON line with the
-- request count, errors and latency percentiles in microseconds, for bench/run.py to read.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.path = os.getenv("URL_PATH")
wrk.headers["Content-Type"] = "application/json"

local bad = 0
response = function(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

-- response() runs per thread; a single thread (-t1) keeps the count in one place.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"socket_errors":%d,"status_errors":%d,"non200":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    latency.mean, e.connect + e.read + e.write + e.timeout, e.status, bad))
end
