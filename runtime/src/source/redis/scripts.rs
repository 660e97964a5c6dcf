//! The Lua scripts that make a commit and a renewal atomic: Redis runs a script whole, with
//! nothing else in between.

/// A commit. KEYS: the settled streams, then the output streams. ARGV: group, consumer,
/// maxlen (`""` for none), the number of settled streams; per settled stream the number of
/// its ids and the ids; the number of outputs; per output its key's index in KEYS, its number
/// of fields and the fields. Returns `{1, 0}` when done; `{0, s}` when the `s`th settled stream
/// holds an entry this consumer no longer owns (another took it over, or it was acked), and
/// `{-1, k}` when output key `k` is not a stream: both before anything is written.
pub(super) const COMMIT: &str = r"
local group, me, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ns = tonumber(ARGV[4])
local a = 5
local acks = {}
for s = 1, ns do
  local n = tonumber(ARGV[a]); a = a + 1
  local ids = {}
  for j = 1, n do
    local id = ARGV[a]; a = a + 1
    local p = redis.call('XPENDING', KEYS[s], group, id, id, 1)
    if #p == 0 or p[1][2] ~= me then return {0, s} end
    ids[j] = id
  end
  acks[s] = ids
end
for k = ns + 1, #KEYS do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'stream' and t ~= 'none' then return {-1, k} end
end
local no = tonumber(ARGV[a]); a = a + 1
for o = 1, no do
  local key = KEYS[tonumber(ARGV[a])]
  local nf = tonumber(ARGV[a + 1])
  a = a + 2
  local args = {key}
  if maxlen ~= '' then
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
/// which sets their idle time to ARGV[3] ms (0 renews; `claim-idle` lets any consumer's
/// `XAUTOCLAIM` take them at once) without counting a delivery. KEYS: the stream. ARGV: group,
/// consumer, idle ms, ids. Returns how many it renewed; entries another consumer owns now
/// are left to it.
pub(super) const TOUCH: &str = r"
local group, me, idle = ARGV[1], ARGV[2], ARGV[3]
local mine = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == me then mine[#mine + 1] = ARGV[i] end
end
local i = 1
while i <= #mine do
  local args = {KEYS[1], group, me, 0}
  for j = i, math.min(i + 499, #mine) do args[#args + 1] = mine[j] end
  args[#args + 1] = 'IDLE'; args[#args + 1] = idle; args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
  i = i + 500
end
return #mine
";
