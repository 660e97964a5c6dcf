//! The Lua scripts that make a commit and a renewal atomic: Redis runs a script whole, with
//! nothing else in between.

/// A commit. KEYS: the settled streams, then the output streams. ARGV: group, consumer,
/// maxlen (`""` for none), the number of settled streams; per settled stream the number of
/// its ids and the ids; the number of outputs; per output its key's index in KEYS, whether it
/// takes the maxlen (`1`/`0`), its number of fields and the fields. Returns `{1, 0}` when done;
/// `{2, 0}` when none of the entries is pending any more (an earlier try of this commit went
/// through, its answer lost): nothing written again; `{0, s}` when the `s`th settled stream
/// holds an entry this consumer no longer owns (another took it over, or acked it), and
/// `{-1, k}` when output key `k` is not a stream: both before anything is written.
pub(super) const COMMIT: &str = r"
local group, me, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ns = tonumber(ARGV[4])
local a = 5
local acks = {}
local total, gone, gone_in = 0, 0, 0
for s = 1, ns do
  local n = tonumber(ARGV[a]); a = a + 1
  local ids = {}
  for j = 1, n do
    local id = ARGV[a]; a = a + 1
    local p = redis.call('XPENDING', KEYS[s], group, id, id, 1)
    total = total + 1
    if #p == 0 then
      gone = gone + 1
      if gone_in == 0 then gone_in = s end
    elseif p[1][2] ~= me then
      return {0, s}
    end
    ids[j] = id
  end
  acks[s] = ids
end
if total > 0 and gone == total then return {2, 0} end
if gone > 0 then return {0, gone_in} end
for k = ns + 1, #KEYS do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'stream' and t ~= 'none' then return {-1, k} end
end
local no = tonumber(ARGV[a]); a = a + 1
for o = 1, no do
  local key = KEYS[tonumber(ARGV[a])]
  local capped = ARGV[a + 1] == '1'
  local nf = tonumber(ARGV[a + 2])
  a = a + 3
  local args = {key}
  if capped and maxlen ~= '' then
    args[2] = 'MAXLEN'; args[3] = '~'; args[4] = maxlen
  end
  args[#args + 1] = '*'
  for f = 1, nf * 2 do
    args[#args + 1] = ARGV[a]; a = a + 1
  end
  redis.call('XADD', unpack(args))
end
for s = 1, ns do
  local ids = acks[s]
  local i = 1
  while i <= #ids do
    local chunk = {}
    for j = i, math.min(i + 499, #ids) do chunk[#chunk + 1] = ids[j] end
    redis.call('XACK', KEYS[s], group, unpack(chunk))
    i = i + 500
  end
end
return {1, 0}
";

/// Renews (or gives back) entries this consumer still owns: `XCLAIM ... JUSTID` to itself,
/// which sets their idle time to ARGV[3] ms without counting a delivery. 0 renews them. Above
/// 0 gives them back: idle for `claim-idle`, any consumer's `XAUTOCLAIM` takes them at once,
/// and since that claim counts a delivery, the count is set one lower first, so an entry given
/// back unrun keeps its attempt number. KEYS: the stream. ARGV: group, consumer, idle ms, ids.
/// Returns how many it touched; entries another consumer owns now are left to it.
pub(super) const TOUCH: &str = r"
local group, me, idle = ARGV[1], ARGV[2], ARGV[3]
local mine = {}
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == me then
    n = n + 1
    if idle == '0' then
      mine[#mine + 1] = ARGV[i]
    else
      local count = math.max(tonumber(p[1][4]) - 1, 0)
      redis.call('XCLAIM', KEYS[1], group, me, 0, ARGV[i], 'IDLE', idle, 'RETRYCOUNT', count, 'JUSTID')
    end
  end
end
local i = 1
while i <= #mine do
  local args = {KEYS[1], group, me, 0}
  for j = i, math.min(i + 499, #mine) do args[#args + 1] = mine[j] end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
  i = i + 500
end
return n
";
