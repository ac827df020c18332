-- wrk script for benchmarks/run.py: which requests to send, and a JSON summary at the end.
--
--   wrk ... -s wrk.lua -- list FILE          GET each "PATH<TAB>AUTHORIZATION" line of FILE in turn
--   wrk ... -s wrk.lua -- random N AUTH      GET /v1/videos/bench-NNNNNNN, NNNNNNN random in [0, N)
--   wrk ... -s wrk.lua -- post FILE AUTH     POST /v1/videos with FILE as the JSON body

local mode, requests, count, index, auth, size = nil, {}, 0, 0, nil, 0

function init(args)
  mode = args[1]
  if mode == "list" then
    for line in io.lines(args[2]) do
      local path, header = line:match("^([^\t]+)\t(.+)$")
      count = count + 1
      requests[count] = wrk.format("GET", path, { ["Authorization"] = header })
    end
    -- Threads start at different places so they do not poll the same task at the same moment.
    index = math.random(0, count - 1)
  elseif mode == "random" then
    size = tonumber(args[2])
    auth = args[3]
    math.randomseed(os.time() + math.random(1, 1000000))
  elseif mode == "post" then
    local file = assert(io.open(args[2], "rb"))
    local body = file:read("*a")
    file:close()
    requests[1] = wrk.format("POST", "/v1/videos", {
      ["Authorization"] = args[3],
      ["Content-Type"] = "application/json",
    }, body)
    count = 1
  else
    error("unknown mode " .. tostring(mode))
  end
end

function request()
  if mode == "random" then
    local path = string.format("/v1/videos/bench-%07d", math.random(0, size - 1))
    return wrk.format("GET", path, { ["Authorization"] = auth })
  end
  index = index % count + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"non_2xx": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
