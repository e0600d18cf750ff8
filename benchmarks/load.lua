-- Load for POST /payments, driven by run.py:
--   wrk -t1 -c32 -d10s -s load.lua http://127.0.0.1:PORT -- MODE NONCE REPLAY_KEYS TENANT
-- MODE new:    every request carries a key never sent before: NONCE (fresh per run), the wrk
--              thread id and a per-thread counter.
-- MODE replay: keys cycle over REPLAY_KEYS keys "NONCE-0" ... that run.py sent once before
--              the run, so every request is a replay of a completed one.
-- done() prints one line "BENCH {json}" that run.py reads.

local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
end

function init(args)
  mode = args[1] or "new"
  nonce = args[2] or "run"
  replay_keys = tonumber(args[3] or "16")
  counter = 0
  headers = {
    ["Content-Type"] = "application/json",
    ["X-Tenant-Id"] = args[4] or "acme",
  }
  -- About 300 bytes, the shape of a card payment; the same for every request of every mode.
  body = [[{"amount":2599,"currency":"EUR","customer":"cus_8f2b6c1d4e","description":"Order 10482: 2x coffee beans 1kg, express shipping","source":{"method":"card","last4":"4242","exp_month":12,"exp_year":2029},"metadata":{"order_id":"10482","channel":"web","campaign":"winter-sale"},"capture":true,"statement_descriptor":"ACME COFFEE"}]]
end

function request()
  counter = counter + 1
  if mode == "new" then
    headers["Idempotency-Key"] = nonce .. "-" .. tid .. "-" .. counter
  else
    headers["Idempotency-Key"] = nonce .. "-" .. (counter % replay_keys)
  end
  return wrk.format("POST", "/payments", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
