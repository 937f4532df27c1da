"""The Lua scripts of RedisMeta (meta/redis.py): every write, and the paged reads.

Strategy: one write script holds every read-then-write of the metadata, so each public write
is one atomic step in Redis, whichever node runs it. Its preamble enforces the cluster write
lock and keeps the transaction journal:

- outside a transaction (token ""): refuse with HMACFS_LOCKED while any node holds the lock
  (the caller waits and retries), and first roll back the journal a dead holder left;
- inside one (the holder's token): refuse with HMACFS_LOST when the lock is no longer ours,
  renew it otherwise, and before the first change of each hash field or sorted-set member
  note its old value (or its absence) in the journal. Rollback puts those values back.

The journal works per field and per member, not per key (DUMP/RESTORE): the path, expiry and
usage keys hold every file of the deployment, and dumping them in each transaction would
cost O(files) where the transaction touches a handful of entries.

Keys are built in the script from the prefix (ARGV[1]), so this needs one Redis (or a
primary with replicas / Sentinel), not Redis Cluster. Records are JSON objects without their
None fields; the script reads only size, uploader, expires, image, blob and location, and
stores the JSON it was given untouched (cjson would re-encode floats with 14 digits).
"""

WRITE = r"""
local P, TOKEN, TTL, OP = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local A = {}
for i = 5, #ARGV do A[#A + 1] = ARGV[i] end
local call = redis.call
local LOCK, JOURNAL = P .. 'lock', P .. 'journal'
local K = {file = P .. 'file', paths = P .. 'paths', exp = P .. 'exp', img = P .. 'img',
           usage = P .. 'usage', bcount = P .. 'bcount', vloc = P .. 'vloc', bref = P .. 'bref',
           bsize = P .. 'bsize', bidx = P .. 'bidx', bstat = P .. 'bstat', logusers = P .. 'logusers',
           partial = P .. 'partial', pexp = P .. 'pexp', ban = P .. 'ban', bans = P .. 'bans'}

local function restore_journal()
  local j = call('HGETALL', JOURNAL)
  for i = 1, #j, 2 do
    local f, v = j[i], j[i + 1]
    local colon = string.find(f, ':', 2, true)
    local n = tonumber(string.sub(f, 2, colon - 1))
    local key, member = string.sub(f, colon + 1, colon + n), string.sub(f, colon + n + 1)
    if string.sub(f, 1, 1) == 'Z' then
      if v == '' then call('ZREM', key, member) else call('ZADD', key, string.sub(v, 2), member) end
    else
      if v == '' then call('HDEL', key, member) else call('HSET', key, member, string.sub(v, 2)) end
    end
  end
  call('DEL', JOURNAL)
end

local holder = call('GET', LOCK)
if OP == 'acquire' then
  if holder then return 0 end
  if call('EXISTS', JOURNAL) == 1 then restore_journal() end  -- a holder died mid-transaction
  call('SET', LOCK, TOKEN, 'PX', TTL)
  return 1
elseif OP == 'renew' or OP == 'commit' or OP == 'rollback' then
  if holder ~= TOKEN then return 0 end
  if OP == 'renew' then call('PEXPIRE', LOCK, TTL)
  elseif OP == 'rollback' then restore_journal()
  else call('DEL', JOURNAL, LOCK) end
  return 1
end
if TOKEN ~= '' then
  if holder ~= TOKEN then return redis.error_reply('HMACFS_LOST the cluster write lock expired') end
  call('PEXPIRE', LOCK, TTL)
elseif holder then
  return redis.error_reply('HMACFS_LOCKED')
elseif call('EXISTS', JOURNAL) == 1 then
  restore_journal()
end

local function save(kind, key, member)
  if TOKEN == '' then return end
  local f = kind .. #key .. ':' .. key .. member
  if call('HEXISTS', JOURNAL, f) == 0 then
    local old
    if kind == 'Z' then old = call('ZSCORE', key, member) else old = call('HGET', key, member) end
    call('HSET', JOURNAL, f, old and ('=' .. old) or '')
  end
end
local function zadd(key, score, member) save('Z', key, member); call('ZADD', key, score, member) end
local function zrem(key, member) save('Z', key, member); call('ZREM', key, member) end
local function hset(key, field, value) save('H', key, field); call('HSET', key, field, value) end
local function hdel(key, field) save('H', key, field); return call('HDEL', key, field) end
local function hincr(key, field, by)
  save('H', key, field)
  if by == 0 then by = 0 end  -- never "-0"
  return call('HINCRBY', key, field, by)
end
local function count(key, field, by)  -- a counter that leaves the hash at 0
  if hincr(key, field, by) <= 0 then hdel(key, field) end
end

-- Usage follows every file and version row (SQLite does it with triggers).
local function account(rec, sign)
  local size = sign * rec.size
  hincr(K.usage, 'F', sign); hincr(K.usage, 'B', size)
  if rec.uploader then hincr(K.usage, 'f:' .. rec.uploader, sign); hincr(K.usage, 'b:' .. rec.uploader, size) end
  if rec.blob then count(K.bcount, rec.blob, sign) end
end
local function index_file(rec)
  zadd(K.paths, 0, rec.path)
  if rec.expires then zadd(K.exp, rec.expires, rec.path) end
  if rec.uploader then zadd(P .. 'up:' .. rec.uploader, 0, rec.path) end
  if rec.image then zadd(K.img, 0, rec.path); zadd(P .. 'img:' .. rec.image, 0, rec.path) end
  account(rec, 1)
end
local function unindex_file(rec)
  zrem(K.paths, rec.path); zrem(K.exp, rec.path)
  if rec.uploader then zrem(P .. 'up:' .. rec.uploader, rec.path) end
  if rec.image then zrem(K.img, rec.path); zrem(P .. 'img:' .. rec.image, rec.path) end
  account(rec, -1)
end
local function drop_blob(sha, size, refs)
  hdel(K.bref, sha); hdel(K.bsize, sha); zrem(K.bidx, sha)
  hincr(K.bstat, 'n', -1); hincr(K.bstat, 'bytes', -size); hincr(K.bstat, 'logical', -size * refs)
end
local function new_blob(sha, size, refs)
  hset(K.bref, sha, refs); hset(K.bsize, sha, size); zadd(K.bidx, 0, sha)
  hincr(K.bstat, 'n', 1); hincr(K.bstat, 'bytes', size); hincr(K.bstat, 'logical', size * refs)
end

if OP == 'put' then  -- A: mode ('put' or 'new'), record JSON
  local rec = cjson.decode(A[2])
  local old = call('HGET', K.file, rec.path)
  if old then
    if A[1] == 'new' then return 0 end
    unindex_file(cjson.decode(old))
  end
  hset(K.file, rec.path, A[2]); index_file(rec)
  return 1
elseif OP == 'take' then  -- A: path, expired_at ('' for any row)
  local old = call('HGET', K.file, A[1])
  if not old then return false end
  local rec = cjson.decode(old)
  if A[2] ~= '' and (not rec.expires or rec.expires > tonumber(A[2])) then return false end
  hdel(K.file, A[1]); unindex_file(rec)
  return old
elseif OP == 'blob_acquire' then  -- A: sha256, size
  local refs = call('HGET', K.bref, A[1])
  if not refs then new_blob(A[1], tonumber(A[2]), 1); return 1 end
  hincr(K.bstat, 'logical', tonumber(call('HGET', K.bsize, A[1])))
  return hincr(K.bref, A[1], 1)
elseif OP == 'blob_release' then  -- A: sha256
  local refs = call('HGET', K.bref, A[1])
  if not refs then return 0 end
  local size = tonumber(call('HGET', K.bsize, A[1]))
  if tonumber(refs) <= 1 then drop_blob(A[1], size, tonumber(refs)); return 0 end
  hincr(K.bstat, 'logical', -size)
  return hincr(K.bref, A[1], -1)
elseif OP == 'set_blob_refs' then  -- A: sha256, size, refs
  local old, refs = call('HGET', K.bref, A[1]), tonumber(A[3])
  local size = tonumber(call('HGET', K.bsize, A[1]) or A[2])
  if old and refs <= 0 then drop_blob(A[1], size, tonumber(old))
  elseif old then hset(K.bref, A[1], refs); hincr(K.bstat, 'logical', size * (refs - tonumber(old)))
  elseif refs > 0 then new_blob(A[1], size, refs) end
  return 0
elseif OP == 'add_version' then  -- A: path, version, record JSON
  local key = P .. 'vh:' .. A[1]
  if call('HEXISTS', key, A[2]) == 1 then return redis.error_reply('HMACFS_DUPLICATE version exists') end
  local rec = cjson.decode(A[3])
  hset(key, A[2], A[3]); account(rec, 1)
  if rec.location then count(K.vloc, rec.location, 1) end
  return 1
elseif OP == 'drop_versions' then  -- A: path, keep; returns the dropped JSON, oldest first
  local key, all, vs, out = P .. 'vh:' .. A[1], call('HGETALL', P .. 'vh:' .. A[1]), {}, {}
  for i = 1, #all, 2 do vs[#vs + 1] = {tonumber(all[i]), all[i], all[i + 1]} end
  table.sort(vs, function(a, b) return a[1] < b[1] end)
  for i = 1, math.min(#vs - tonumber(A[2]), #vs) do
    local rec = cjson.decode(vs[i][3])
    hdel(key, vs[i][2]); account(rec, -1)
    if rec.location then count(K.vloc, rec.location, -1) end
    out[#out + 1] = vs[i][3]
  end
  return out
elseif OP == 'log_upload' then  -- A: uploader, at, size; members unique by a sequence number
  local seq = call('INCR', P .. 'logseq')
  zadd(P .. 'log:' .. A[1], A[2], seq .. ':' .. A[3]); zadd(K.logusers, 0, A[1])
  return 1
elseif OP == 'prune_upload_log' then  -- A: before
  for _, u in ipairs(call('ZRANGE', K.logusers, 0, -1)) do
    local key = P .. 'log:' .. u
    for _, m in ipairs(call('ZRANGEBYSCORE', key, '-inf', '(' .. A[1])) do zrem(key, m) end
    if call('ZCARD', key) == 0 then zrem(K.logusers, u) end
  end
  return 1
elseif OP == 'partial_put' then  -- A: id, expires, record JSON (its expires lives in the score)
  hset(K.partial, A[1], A[3]); zadd(K.pexp, A[2], A[1])
  return 1
elseif OP == 'partial_touch' then  -- A: id, expires
  if call('HEXISTS', K.partial, A[1]) == 1 then zadd(K.pexp, A[2], A[1]) end
  return 1
elseif OP == 'partial_delete' or OP == 'ban_remove' then  -- A: id or address
  local h, z = K.partial, K.pexp
  if OP == 'ban_remove' then h, z = K.ban, K.bans end
  if call('HEXISTS', h, A[1]) == 0 then return 0 end
  hdel(h, A[1]); zrem(z, A[1])
  return 1
elseif OP == 'ban_put' then  -- A: address, until, record JSON
  hset(K.ban, A[1], A[3]); zadd(K.bans, A[2], A[1])
  return 1
elseif OP == 'bans_purge' then  -- A: now
  local gone = call('ZRANGEBYSCORE', K.bans, '-inf', A[1])
  for _, a in ipairs(gone) do hdel(K.ban, a); zrem(K.bans, a) end
  return #gone
end
return redis.error_reply('HMACFS_UNKNOWN op ' .. OP)
"""

# Rows through an index, as one snapshot: ARGV = rows hash, index key, 'lex' or 'score', min,
# max, limit. Returns id, score, JSON (false when the row is gone) for each index entry.
READ = r"""
local rows, index, kind, lo, hi, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ids
if kind == 'lex' then ids = redis.call('ZRANGEBYLEX', index, lo, hi, 'LIMIT', 0, limit)
else ids = redis.call('ZRANGEBYSCORE', index, lo, hi, 'WITHSCORES', 'LIMIT', 0, limit) end
local out, step = {}, (kind == 'lex') and 1 or 2
for i = 1, #ids, step do
  out[#out + 1] = ids[i]
  out[#out + 1] = (step == 2) and ids[i + 1] or '0'
  out[#out + 1] = redis.call('HGET', rows, ids[i])
end
return out
"""
