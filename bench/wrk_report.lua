-- Appended to every wrk script the suite writes: after the run, print wrk's exact counters and
-- its latency histogram (microseconds) so that the suite can build an HDR histogram from it.
-- wrk keeps one counter per microsecond; `latency(i)` is the i-th non-empty one. Each call
-- scans from the minimum, so the whole walk costs (non-empty buckets) x (max - min); past a
-- budget the script prints percentiles instead (enough for the percentile distribution).
-- These figures include wrk's own adjustment for coordinated omission (stats_correct), as the
-- percentiles wrk prints do.

local dump_budget = 3e8

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "@@bench requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
      summary.requests, summary.bytes, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout))
   io.write(string.format("@@bench-latency min=%d max=%d\n", latency.min, latency.max))
   local buckets = #latency
   if buckets * (latency.max - latency.min + 1) <= dump_budget then
      for i = 1, buckets do
         local value, count = latency(i)
         io.write(string.format("@@v %d %d\n", value, count))
      end
   else
      local p = 0.0
      while p < 99.9999 do
         io.write(string.format("@@p %.6f %d\n", p, latency:percentile(p)))
         p = p + (100 - p) / 10
      end
      for step = 0, 99 do
         io.write(string.format("@@p %.6f %d\n", step, latency:percentile(step)))
      end
      io.write(string.format("@@p 100 %d\n", latency.max))
   end
end
