-- wrk script: every write is DEPTH pipelined GET / requests (wrk -s pipeline.lua URL -- DEPTH).
-- A load generator this light (one send per DEPTH requests) leaves most of its core free, so a
-- second server worker on that core has CPU to use (bench/workers_bench.py, "pipelined").
init = function(args)
   local depth = tonumber(args[1]) or 64
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, "/")
   end
   req = table.concat(r)
end

request = function()
   return req
end
