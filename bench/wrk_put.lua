-- wrk script for the 4 KiB PUT runs: every request PUTs a unique, pre-signed path.
-- hmacfs refuses a second PUT to a path (409), and every path needs its own HMAC, which
-- Lua cannot compute here, so bench/run.py writes the signed paths to LIST.<thread id>
-- (one "/upload/...?v=<hex>" per line) and passes: -- LIST BODY_SIZE
-- init() reads the list as one string (milliseconds, so a thread does not start long before
-- the others) and request() walks it line by line. A thread that runs out of paths wraps
-- around; done() reports that as "wrapped" and bench/run.py sizes the lists so it cannot.

local next_id = 0
local threads = {}

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local data
local pos = 1
local body
wrapped = 0

function init(args)
   local f = assert(io.open(args[1] .. "." .. id, "rb"))
   data = f:read("*a")
   f:close()
   assert(#data > 0, "empty path list")
   body = string.rep("x", tonumber(args[2]))
end

function request()
   local nl = string.find(data, "\n", pos, true)
   if nl == nil then
      pos = 1
      wrapped = 1
      nl = string.find(data, "\n", pos, true)
   end
   local path = string.sub(data, pos, nl - 1)
   pos = nl + 1
   return wrk.format("PUT", path, nil, body)
end

function done(summary, latency, requests)
   local any_wrapped = 0
   for _, thread in ipairs(threads) do
      if thread:get("wrapped") == 1 then
         any_wrapped = 1
      end
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "wrapped": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), any_wrapped))
end
