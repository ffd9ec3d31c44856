-- wrk script of the benchmark: POST a small chat completion, report one JSON line.
-- Usage: wrk ... -s bench/post.lua <url> -- <model> ["Header: value" ...]

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
   local model = args[1] or "openai/gpt-4o-mini"
   for i = 2, #args do
      local name, value = args[i]:match("^([^:]+):%s*(.*)$")
      if name then
         wrk.headers[name] = value
      end
   end
   wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hello"}],'
      .. '"max_tokens":16}'
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,'
      .. '"write":%d,"status":%d,"timeout":%d},"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
