/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Page-table pages reused as data, and data pages reused as page tables: the guest maps
 * a page through its own tables, unmaps it, overwrites the old tables with data over
 * several flushes (write flooding for a shadow MMU), checks the data, maps again
 * through fresh tables, then turns an old table page back into a page table. Each step
 * checks what it reads and prints ok.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set T, 0x400000		/* old tables: PML4, PDPT, PD, PT */
	.set N, 0x410000		/* new tables: PDPT, PD, PT */
	.set P0, 0x600000
	.set P1, 0x601000
	.set VA, 0x8000000000
	.set ROUNDS, 6
_start:
	mov	byte ptr [P0], 0x11
	mov	byte ptr [P1], 0x22
	mov	rax, [0x1000]			/* rvmm-run's identity map */
	mov	[T], rax
	mov	qword ptr [T + 8], T + 0x1000 + 3
	mov	qword ptr [T + 0x1000], T + 0x2000 + 3
	mov	qword ptr [T + 0x2000], T + 0x3000 + 3
	mov	qword ptr [T + 0x3000], P0 + 3
	mov	rax, T
	mov	cr3, rax
	movabs	rdi, VA
	cmp	byte ptr [rdi], 0x11
	jne	fail
	lea	rsi, [rip + s_mapped]
	call	puts

	/* Unmap, then the old PDPT, PD and PT become data. */
	mov	qword ptr [T + 8], 0
	mov	rax, T
	mov	cr3, rax
	xor	r8d, r8d			/* round */
1:	mov	rdx, 0x0101010101010101
	imul	rdx, r8
	mov	rdi, T + 0x1000
	mov	ecx, 3 * 512
2:	mov	[rdi], rdx
	add	rdi, 8
	dec	ecx
	jnz	2b
	mov	rax, T
	mov	cr3, rax
	inc	r8d
	cmp	r8d, ROUNDS
	jne	1b
	/* The data is what was written last. */
	mov	rdx, 0x0505050505050505
	mov	rdi, T + 0x1000
	mov	ecx, 3 * 512
3:	cmp	[rdi], rdx
	jne	fail
	add	rdi, 8
	dec	ecx
	jnz	3b
	lea	rsi, [rip + s_data]
	call	puts

	/* Map again through fresh tables, to the other page. */
	mov	qword ptr [N], N + 0x1000 + 3
	mov	qword ptr [N + 0x1000], N + 0x2000 + 3
	mov	qword ptr [N + 0x2000], P1 + 3
	mov	qword ptr [T + 8], N + 3
	mov	rax, T
	mov	cr3, rax
	movabs	rdi, VA
	cmp	byte ptr [rdi], 0x22
	jne	fail
	lea	rsi, [rip + s_fresh]
	call	puts

	/* A data page (the old PT) becomes a page table again. */
	mov	rdi, T + 0x3000
	mov	ecx, 512
	xor	eax, eax
	rep	stosq
	mov	qword ptr [T + 0x3000], P0 + 3
	mov	qword ptr [N + 0x1000], T + 0x3000 + 3
	movabs	rdi, VA
	invlpg	[rdi]
	cmp	byte ptr [rdi], 0x11
	jne	fail
	lea	rsi, [rip + s_back]
	call	puts

	/* LOCK CMPXCHG8B on a page-directory entry (how PAE kernels write entries). */
	mov	edi, N + 0x1000
	mov	eax, [rdi]		/* the entry as it is (the CPU set its A flag) */
	mov	edx, [rdi + 4]
	mov	ebx, N + 0x2000 + 3
	xor	ecx, ecx
	lock	cmpxchg8b [rdi]
	jne	fail
	movabs	rdi, VA
	invlpg	[rdi]
	cmp	byte ptr [rdi], 0x22
	jne	fail
	/* A second one with a stale expected value fails and loads the entry. */
	mov	eax, T + 0x3000 + 3
	xor	edx, edx
	mov	edi, N + 0x1000
	lock	cmpxchg8b [rdi]
	je	fail
	and	eax, ~0x60		/* A/D as the CPU may have set them */
	cmp	eax, N + 0x2000 + 3
	jne	fail
	lea	rsi, [rip + s_cx8]
	call	puts
	xor	ebx, ebx
	mov	al, 0x2c
	out	0xf4, al
fail:
	lea	rsi, [rip + s_fail]
	call	puts
	mov	al, 0x2d
	out	0xf4, al

puts:
	mov	dx, 0x3f8
4:	lodsb
	test	al, al
	jz	5f
	out	dx, al
	jmp	4b
5:	ret

	.data
s_mapped: .asciz "ptreuse64: mapped through own tables: ok\n"
s_data:	.asciz	"old tables overwritten with data 6 times: data ok\n"
s_fresh: .asciz	"mapped again through fresh tables: ok\n"
s_back:	.asciz	"old PT page is a page table again: ok\n"
s_cx8:	.asciz	"cmpxchg8b on a page-directory entry: ok\n"
s_fail:	.asciz	"FAILED\n"
